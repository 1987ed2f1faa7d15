package io.keybinder.esignet;

import static io.keybinder.esignet.TestSupport.challenge;
import static io.keybinder.esignet.TestSupport.environment;
import static io.keybinder.esignet.TestSupport.headers;
import static io.keybinder.esignet.TestSupport.jwk;
import static io.keybinder.esignet.TestSupport.otpFromOutbox;
import static io.keybinder.esignet.TestSupport.serverProperties;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.mosip.esignet.api.dto.AuthChallenge;
import io.mosip.esignet.api.exception.KeyBindingException;
import io.mosip.esignet.api.exception.SendOtpException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.security.KeyPairGenerator;
import java.security.interfaces.ECPublicKey;
import java.security.interfaces.RSAPublicKey;
import java.time.Duration;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/** Every refusal and failure reaches eSignet as one of its error codes (README "Error codes"). */
@ExtendWith(LogCapture.class)
class ErrorMappingTest {

    static KeyBinderGrpcBinder binder;
    static final TestSupport.Person DAN = TestSupport.person("errors");

    @BeforeAll
    static void start() {
        binder = new KeyBinderGrpcBinder(environment(serverProperties()));
    }

    @AfterAll
    static void stop() {
        binder.close();
    }

    private static String sendOtp() throws Exception {
        return otpFromOutbox(binder.sendBindingOtp(DAN.id(), List.of("email"), headers()).getTransactionId());
    }

    private static Map<String, Object> rsaJwk() throws Exception {
        return jwk((RSAPublicKey) TestSupport.rsaKeyPair().getPublic());
    }

    private static KeyBindingException bindFails(KeyBinderGrpcBinder binder, String id, List<AuthChallenge> challenges,
            Map<String, Object> jwk, Map<String, String> headers) {
        return assertThrows(KeyBindingException.class, () -> binder.doKeyBinding(id, challenges, jwk, "WLA", headers));
    }

    private static List<AuthChallenge> otp(String value) {
        return List.of(challenge("OTP", "alpha-numeric", value));
    }

    private static String wrong(String otp) {
        return (otp.charAt(0) == '1' ? "2" : "1") + otp.substring(1);
    }

    @Test
    void wrongAndReusedOtpsAreAuthFailed() throws Exception {
        String otp = sendOtp();
        assertEquals("auth_failed", bindFails(binder, DAN.id(), otp(wrong(otp)), rsaJwk(), headers()).getErrorCode());
        assertTrue(LogCapture.lines().stream().anyMatch(l -> l.startsWith("INFO") && l.contains("[auth_failed]")),
                "a refused challenge is the user's doing: INFO, not an error");
        binder.doKeyBinding(DAN.id(), otp(otp), rsaJwk(), "WLA", headers());
        KeyBindingException reused = bindFails(binder, DAN.id(), otp(otp), rsaJwk(), headers());
        assertEquals("auth_failed", reused.getErrorCode());
        assertTrue(reused.getMessage().contains("UNAUTHENTICATED [auth_failed]"), reused.getMessage());
    }

    @Test
    void aBadJwkIsInvalidPublicKey() throws Exception {
        String otp = sendOtp();
        KeyPairGenerator weak = KeyPairGenerator.getInstance("RSA");
        weak.initialize(1024);
        Map<String, Object> small = jwk((RSAPublicKey) weak.generateKeyPair().getPublic());
        assertEquals("invalid_public_key", bindFails(binder, DAN.id(), otp(otp), small, headers()).getErrorCode());
        Map<String, Object> garbled = new LinkedHashMap<>(rsaJwk());
        garbled.put("n", "not base64url!");
        assertEquals("invalid_public_key", bindFails(binder, DAN.id(), otp(otp), garbled, headers()).getErrorCode());
        assertEquals("invalid_public_key",
                bindFails(binder, DAN.id(), otp(otp), Map.of("kty", "oct", "k", "AAAA"), headers()).getErrorCode());
        // The JWK refusals spent no OTP attempt that matters: the same OTP still binds.
        binder.doKeyBinding(DAN.id(), otp(otp), rsaJwk(), "WLA", headers());
    }

    @Test
    void anEcKeyIsRefusedByThePluginUnderRsaOnly() throws Exception {
        String otp = sendOtp();
        Map<String, Object> ec = jwk((ECPublicKey) TestSupport.ecKeyPair().getPublic());
        KeyBindingException refused = bindFails(binder, DAN.id(), otp(otp), ec, headers());
        assertEquals("invalid_public_key", refused.getErrorCode());
        assertTrue(refused.getMessage().contains("EC-P256") && refused.getMessage().contains("allowed: RSA"),
                refused.getMessage());
        // Refused before any call: the OTP is untouched, and a plugin pointed at nothing refuses the same way.
        binder.doKeyBinding(DAN.id(), otp(otp), rsaJwk(), "WLA", headers());
        Map<String, String> nowhere = new HashMap<>(serverProperties());
        nowhere.put("keybinder.grpc.target", "127.0.0.1:" + freePort());
        try (KeyBinderGrpcBinder offline = new KeyBinderGrpcBinder(environment(nowhere))) {
            assertEquals("invalid_public_key", bindFails(offline, DAN.id(), otp("123456"), ec, headers()).getErrorCode());
        }
        // Where the plugin allows EC keys it passes them on; the server then applies its own key-type rule
        // for the partner (RSA only under examples/esignet.toml, issue 11), or binds.
        Map<String, String> ecAllowed = new HashMap<>(serverProperties());
        ecAllowed.put("keybinder.grpc.allowed-key-types", "RSA, EC-P256");
        try (KeyBinderGrpcBinder lenient = new KeyBinderGrpcBinder(environment(ecAllowed))) {
            String otp2 = sendOtp();
            if (TestSupport.SERVER_RSA_ONLY) {
                KeyBindingException server = bindFails(lenient, DAN.id(), otp(otp2), ec, headers());
                assertEquals("invalid_public_key", server.getErrorCode());
                assertFalse(server.getMessage().contains("allowed: RSA)"), "refused by the server this time");
            } else {
                lenient.doKeyBinding(DAN.id(), otp(otp2), ec, "WLA", headers());
            }
        }
    }

    @Test
    void unknownAndMalformedIndividualsAndChannels() throws Exception {
        String stranger = String.valueOf(100_000_000_000L + (long) (Math.random() * 800_000_000_000L));
        SendOtpException unknown = assertThrows(SendOtpException.class,
                () -> binder.sendBindingOtp(stranger, List.of("email"), headers()));
        assertEquals("send_otp_failed", unknown.getErrorCode());
        assertEquals("auth_failed",
                bindFails(binder, stranger, otp("123456"), rsaJwk(), headers()).getErrorCode());
        assertEquals("invalid_individual_id", assertThrows(SendOtpException.class,
                () -> binder.sendBindingOtp(" ", List.of("email"), headers())).getErrorCode());
        assertEquals("invalid_otp_channel", assertThrows(SendOtpException.class,
                () -> binder.sendBindingOtp(DAN.id(), List.of("fax"), headers())).getErrorCode());
        assertEquals("invalid_no_of_challenges",
                bindFails(binder, DAN.id(), List.of(), rsaJwk(), headers()).getErrorCode());
        assertEquals("invalid_challenge_format", bindFails(binder, DAN.id(),
                List.of(challenge("OTP", "number", "123456")), rsaJwk(), headers()).getErrorCode());
        assertEquals("invalid_auth_factor_type", assertThrows(KeyBindingException.class, () -> binder.doKeyBinding(
                DAN.id(), otp("123456"), rsaJwk(), "FACE", headers())).getErrorCode());
    }

    @Test
    void aWrongPartnerKeyIsTheOperationsFailureAndNamesNoKey() throws Exception {
        Map<String, String> wrongKey = new LinkedHashMap<>();
        wrongKey.put("partner-id", TestSupport.PARTNER_ID);
        wrongKey.put("partner-api-key", "kb_wrongwrongwrongwrongwrongwrongwrongwrongwro");
        TestSupport.Secrets.add(wrongKey.get("partner-api-key"));
        SendOtpException otp = assertThrows(SendOtpException.class,
                () -> binder.sendBindingOtp(DAN.id(), List.of("email"), wrongKey));
        assertEquals("send_otp_failed", otp.getErrorCode());
        KeyBindingException bind = bindFails(binder, DAN.id(), otp("123456"), rsaJwk(), wrongKey);
        assertEquals("key_binding_failed", bind.getErrorCode());
        assertTrue(bind.getMessage().contains("invalid_partner"), bind.getMessage());
        assertTrue(LogCapture.lines().stream().anyMatch(l -> l.startsWith("SEVERE") && l.contains("invalid_partner")),
                "a misconfigured partner is an error in the operator's log, with the reason");

        // No configured partner: refused at start, since eSignet asks for the formats without headers.
        Map<String, String> anonymous = new HashMap<>(serverProperties());
        anonymous.remove("keybinder.grpc.partner-api-key-source");
        IllegalStateException err = assertThrows(IllegalStateException.class,
                () -> new KeyBinderGrpcBinder(environment(anonymous)));
        assertTrue(err.getMessage().contains("keybinder.grpc.partner-api-key-source"), err.getMessage());
    }

    @Test
    void aServerThatIsDownIsKeyBindingFailedWithinTheDeadline() throws Exception {
        Map<String, String> down = new HashMap<>(serverProperties());
        down.put("keybinder.grpc.target", "127.0.0.1:" + freePort());
        down.put("keybinder.grpc.deadline-ms", "2000");
        try (KeyBinderGrpcBinder offline = new KeyBinderGrpcBinder(environment(down))) {
            long start = System.nanoTime();
            assertEquals("key_binding_failed",
                    bindFails(offline, DAN.id(), otp("123456"), rsaJwk(), headers()).getErrorCode());
            assertEquals("send_otp_failed", assertThrows(SendOtpException.class,
                    () -> offline.sendBindingOtp(DAN.id(), List.of("email"), headers())).getErrorCode());
            assertTrue(Duration.ofNanos(System.nanoTime() - start).toMillis() < 2 * 2000 + 1000);
            assertEquals(List.of(), offline.getSupportedChallengeFormats("OTP"));
        }
        assertTrue(LogCapture.text().contains("UNAVAILABLE"), "the log names the gRPC status");
    }

    @Test
    void aServerThatNeverAnswersIsKeyBindingFailedAtTheDeadline() throws Exception {
        // A listener that accepts connections and never speaks: the call ends at its deadline.
        try (ServerSocket silent = new ServerSocket(0, 50, InetAddress.getLoopbackAddress())) {
            Map<String, String> mute = new HashMap<>(serverProperties());
            mute.put("keybinder.grpc.target", "127.0.0.1:" + silent.getLocalPort());
            mute.put("keybinder.grpc.deadline-ms", "1500");
            try (KeyBinderGrpcBinder stalled = new KeyBinderGrpcBinder(environment(mute))) {
                long start = System.nanoTime();
                KeyBindingException err = bindFails(stalled, DAN.id(), otp("123456"), rsaJwk(), headers());
                long elapsed = Duration.ofNanos(System.nanoTime() - start).toMillis();
                assertEquals("key_binding_failed", err.getErrorCode());
                assertTrue(err.getMessage().contains("DEADLINE_EXCEEDED"), err.getMessage());
                assertTrue(elapsed >= 1400 && elapsed < 1500 + 1500, "ended at the deadline: " + elapsed + " ms");
            }
        }
    }

    @Test
    void withoutItsClientCertificateTheMtlsServerIsUnreachable() throws Exception {
        Map<String, String> noCert = new HashMap<>(serverProperties());
        noCert.remove("keybinder.grpc.client-cert-file");
        noCert.remove("keybinder.grpc.client-key-file");
        noCert.put("keybinder.grpc.deadline-ms", "3000");
        try (KeyBinderGrpcBinder anonymous = new KeyBinderGrpcBinder(environment(noCert))) {
            KeyBindingException err = bindFails(anonymous, DAN.id(), otp("123456"), rsaJwk(), headers());
            assertEquals("key_binding_failed", err.getErrorCode());
            assertTrue(err.getMessage().contains("UNAVAILABLE"), err.getMessage());
        }
        Map<String, String> wrongCa = new HashMap<>(serverProperties());
        wrongCa.remove("keybinder.grpc.ca-file");  // the JVM's trust store: it does not know the test CA
        try (KeyBinderGrpcBinder untrusting = new KeyBinderGrpcBinder(environment(wrongCa))) {
            assertEquals("send_otp_failed", assertThrows(SendOtpException.class,
                    () -> untrusting.sendBindingOtp(DAN.id(), List.of("email"), headers())).getErrorCode());
        }
    }

    @Test
    void aPlaintextChannelOffLoopbackIsWarnedAbout() {
        Map<String, String> p = new HashMap<>();
        p.put("keybinder.grpc.target", "keybinder.example.org:50051");
        p.put("keybinder.grpc.plaintext", "true");
        p.put("keybinder.grpc.partner-id", TestSupport.PARTNER_ID);
        p.put("keybinder.grpc.partner-api-key-source", "file:" + TestSupport.PARTNER_KEY_FILE);
        new KeyBinderGrpcBinder(environment(p)).close();
        assertTrue(LogCapture.lines().stream().anyMatch(l -> l.startsWith("WARNING") && l.contains("plaintext")));
    }

    @Test
    void badPropertiesFailAtStartWithOneLineThatNamesTheProperty() {
        Map<String, String> p = new HashMap<>(serverProperties());
        p.put("keybinder.grpc.partner-api-key-source", "kb_pasted_by_mistake");
        IllegalStateException pasted = assertThrows(IllegalStateException.class,
                () -> new KeyBinderGrpcBinder(environment(p)));
        assertTrue(pasted.getMessage().contains("partner-api-key-source"));
        assertFalse(pasted.getMessage().contains("kb_pasted_by_mistake"), "the value is not echoed");
        p.put("keybinder.grpc.partner-api-key-source", "file:" + TestSupport.PARTNER_KEY_FILE);
        p.put("keybinder.grpc.allowed-key-types", "RSA, DSA");
        assertTrue(assertThrows(IllegalStateException.class, () -> new KeyBinderGrpcBinder(environment(p)))
                .getMessage().contains("DSA"));
        p.remove("keybinder.grpc.allowed-key-types");
        p.remove("keybinder.grpc.target");
        assertTrue(assertThrows(IllegalStateException.class, () -> new KeyBinderGrpcBinder(environment(p)))
                .getMessage().contains("keybinder.grpc.target"));
    }

    static int freePort() throws Exception {
        try (ServerSocket socket = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
            return socket.getLocalPort();
        }
    }
}
