package io.keybinder.esignet;

import static io.keybinder.esignet.TestSupport.challenge;
import static io.keybinder.esignet.TestSupport.environment;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.Any;
import com.google.rpc.ErrorInfo;
import io.grpc.Grpc;
import io.grpc.InsecureServerCredentials;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import io.mosip.esignet.api.exception.KeyBindingException;
import io.mosip.esignet.api.exception.KycAuthException;
import io.mosip.esignet.api.exception.SendOtpException;
import java.security.interfaces.RSAPublicKey;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import keybinder.v1.KeyBinderServiceGrpc;
import keybinder.v1.Keybinder;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.extension.ExtendWith;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

/**
 * The whole error table (README "Error codes"), row by row: a gRPC server in this JVM answers each
 * operation with the status and ErrorInfo of the row, and the plugin must throw the row's eSignet codes.
 * The real server's answers for the reachable rows are in ErrorMappingTest and WlaLoginTest.
 */
@ExtendWith(LogCapture.class)
class ErrorTableTest {

    private static volatile Status.Code nextCode;
    private static volatile String nextReason;
    private static Server server;
    private static KeyBinderGrpcBinder binder;
    private static KeyBinderWlaValidator validator;
    private static Map<String, Object> jwk;

    @BeforeAll
    static void start() throws Exception {
        KeyBinderServiceGrpc.KeyBinderServiceImplBase failing = new KeyBinderServiceGrpc.KeyBinderServiceImplBase() {
            @Override
            public void sendBindingOtp(Keybinder.SendBindingOtpRequest request,
                    StreamObserver<Keybinder.SendBindingOtpResponse> response) {
                response.onError(failure());
            }

            @Override
            public void doKeyBinding(Keybinder.DoKeyBindingRequest request,
                    StreamObserver<Keybinder.DoKeyBindingResponse> response) {
                response.onError(failure());
            }

            @Override
            public void verifyWalletToken(Keybinder.VerifyWalletTokenRequest request,
                    StreamObserver<Keybinder.VerifyWalletTokenResponse> response) {
                response.onError(failure());
            }
        };
        server = Grpc.newServerBuilderForPort(0, InsecureServerCredentials.create()).addService(failing).build().start();
        Map<String, String> p = new HashMap<>();
        p.put("keybinder.grpc.target", "127.0.0.1:" + server.getPort());
        p.put("keybinder.grpc.plaintext", "true");
        p.put("keybinder.grpc.partner-id", "table-wallet");
        p.put("keybinder.grpc.partner-api-key-source", "file:" + TestSupport.PARTNER_KEY_FILE);
        binder = new KeyBinderGrpcBinder(environment(p));
        validator = new KeyBinderWlaValidator(environment(p));
        jwk = TestSupport.jwk((RSAPublicKey) TestSupport.rsaKeyPair().getPublic());
    }

    @AfterAll
    static void stop() throws Exception {
        binder.close();
        validator.close();
        server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }

    private static RuntimeException failure() {
        com.google.rpc.Status.Builder status = com.google.rpc.Status.newBuilder()
                .setCode(nextCode.value()).setMessage("a human sentence");
        if (!nextReason.isEmpty()) {
            status.addDetails(Any.pack(ErrorInfo.newBuilder().setDomain("keybinder").setReason(nextReason).build()));
        }
        return StatusProto.toStatusRuntimeException(status.build());
    }

    @ParameterizedTest(name = "{0} {1} -> {2} / {3} / {4}")
    @CsvSource({
        // status, reason ('' = no ErrorInfo), sendBindingOtp, doKeyBinding, validateBindingAuth
        "UNAUTHENTICATED, auth_failed, auth_failed, auth_failed, auth_failed",
        "FAILED_PRECONDITION, binding_expired, binding_not_found, binding_not_found, binding_not_found",
        "NOT_FOUND, binding_not_found, binding_not_found, binding_not_found, binding_not_found",
        "FAILED_PRECONDITION, binding_revoked, binding_not_found, binding_not_found, binding_not_found",
        "FAILED_PRECONDITION, binding_superseded, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "ALREADY_EXISTS, duplicate_public_key, duplicate_public_key, duplicate_public_key, duplicate_public_key",
        "INVALID_ARGUMENT, invalid_auth_factor_type, invalid_auth_factor_type, invalid_auth_factor_type, invalid_auth_factor_type",
        "INVALID_ARGUMENT, invalid_bind_auth_factor_type, invalid_auth_factor_type, invalid_auth_factor_type, invalid_auth_factor_type",
        "INVALID_ARGUMENT, invalid_challenge, invalid_challenge, invalid_challenge, invalid_challenge",
        "INVALID_ARGUMENT, invalid_challenge_format, invalid_challenge_format, invalid_challenge_format, invalid_challenge_format",
        "INVALID_ARGUMENT, invalid_individual_id, invalid_individual_id, invalid_individual_id, invalid_individual_id",
        "INVALID_ARGUMENT, invalid_no_of_challenges, invalid_no_of_challenges, invalid_no_of_challenges, invalid_no_of_challenges",
        "INVALID_ARGUMENT, invalid_otp_channel, invalid_otp_channel, invalid_otp_channel, invalid_otp_channel",
        "UNAUTHENTICATED, invalid_partner, send_otp_failed, key_binding_failed, unknown_error",
        "INVALID_ARGUMENT, invalid_proof_of_possession, send_otp_failed, key_binding_failed, unknown_error",
        "INVALID_ARGUMENT, proof_of_possession_required, send_otp_failed, key_binding_failed, unknown_error",
        "INVALID_ARGUMENT, invalid_public_key, invalid_public_key, invalid_public_key, invalid_public_key",
        "INVALID_ARGUMENT, invalid_request, invalid_request, invalid_request, invalid_request",
        "INVALID_ARGUMENT, invalid_revocation_reason, invalid_request, invalid_request, invalid_request",
        "INVALID_ARGUMENT, invalid_token_algorithm, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, invalid_token_audience, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, invalid_token_signature, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, invalid_token_subject, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "INVALID_ARGUMENT, invalid_wla_token, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "INTERNAL, key_binding_failed, send_otp_failed, key_binding_failed, unknown_error",
        "UNAVAILABLE, key_binding_failed, send_otp_failed, key_binding_failed, unknown_error",
        "UNAUTHENTICATED, required_header_missing, required_header_missing, required_header_missing, required_header_missing",
        "FAILED_PRECONDITION, send_otp_failed, send_otp_failed, send_otp_failed, send_otp_failed",
        "INVALID_ARGUMENT, sha256_thumbprint_header_missing, sha256_thumbprint_header_missing, sha256_thumbprint_header_missing, sha256_thumbprint_header_missing",
        "UNAUTHENTICATED, sha256_thumbprint_mismatch, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, token_expired, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "INVALID_ARGUMENT, token_lifetime_too_long, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, token_not_yet_valid, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "UNAUTHENTICATED, token_replayed, invalid_wla_token, invalid_wla_token, invalid_wla_token",
        "RESOURCE_EXHAUSTED, too_many_attempts, too_early_attempt, individual_id_blocked, individual_id_blocked",
        "INVALID_ARGUMENT, a_reason_from_a_newer_server, send_otp_failed, key_binding_failed, unknown_error",
        "UNAVAILABLE, '', send_otp_failed, key_binding_failed, unknown_error",
        "DEADLINE_EXCEEDED, '', send_otp_failed, key_binding_failed, unknown_error",
        "INTERNAL, '', send_otp_failed, key_binding_failed, unknown_error",
    })
    void everyReasonMapsToItsEsignetCode(Status.Code code, String reason, String sendOtp, String bind, String wla) {
        nextCode = code;
        nextReason = reason == null ? "" : reason;
        assertEquals(sendOtp, assertThrows(SendOtpException.class,
                () -> binder.sendBindingOtp("1234567890", List.of("email"), Map.of())).getErrorCode());
        KeyBindingException bound = assertThrows(KeyBindingException.class, () -> binder.doKeyBinding("1234567890",
                List.of(challenge("OTP", "alpha-numeric", "123456")), jwk, "WLA", Map.of()));
        assertEquals(bind, bound.getErrorCode());
        KycAuthException login = assertThrows(KycAuthException.class, () -> validator.validateBindingAuth("t",
                "1234567890", List.of(challenge("WLA", "jwt", "a.b.c"))));
        assertEquals(wla, login.getErrorCode());
        // KeyBinder's precise status and reason travel in the message, never the server's sentence.
        assertTrue(login.getMessage().contains(code.name()), login.getMessage());
        assertTrue(login.getMessage().contains(nextReason), login.getMessage());
        assertTrue(!login.getMessage().contains("a human sentence") && !bound.getMessage().contains("a human sentence"));
    }
}
