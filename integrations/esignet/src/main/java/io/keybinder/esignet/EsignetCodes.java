package io.keybinder.esignet;

import io.mosip.esignet.api.util.ErrorConstants;
import java.util.Map;

/**
 * KeyBinder's reasons (google.rpc.ErrorInfo.reason) translated into the error codes eSignet passes on
 * to the wallet. A reason eSignet has a code of the same name for keeps it; the others take the code
 * of eSignet's own code path for the same situation (README "Error codes" names the source of each).
 */
final class EsignetCodes {

    // esignet-core io.mosip.esignet.core.constants.ErrorConstants (v1.8.0): not part of the plugin
    // API jar, so the values are repeated here.
    static final String INVALID_INDIVIDUAL_ID = "invalid_individual_id";
    static final String INVALID_OTP_CHANNEL = "invalid_otp_channel";
    static final String INVALID_NO_OF_CHALLENGES = "invalid_no_of_challenges";
    static final String INVALID_PUBLIC_KEY = "invalid_public_key";
    static final String DUPLICATE_PUBLIC_KEY = "duplicate_public_key";
    static final String NO_ATTEMPTS_LEFT = "no_attempts_left";
    static final String KEY_BINDING_NOT_FOUND = "binding_not_found";
    static final String UNBOUND_AUTH_FACTOR = "unbound_auth_factor";
    static final String INVALID_WLA_TOKEN = "invalid_wla_token";
    static final String SHA256_THUMBPRINT_HEADER_MISSING = "sha256_thumbprint_header_missing";
    static final String UNKNOWN_WLA_FORMAT = "unknown_wla_format";
    // mosip/esignet-plugins IdaKeyBinderImpl.REQUIRED_HEADERS_MISSING.
    static final String REQUIRED_HEADER_MISSING = "required_header_missing";

    /** Reasons that keep their name or take an eSignet code, for sendBindingOtp and doKeyBinding. */
    private static final Map<String, String> BINDING = Map.ofEntries(
            Map.entry("invalid_individual_id", INVALID_INDIVIDUAL_ID),
            Map.entry("invalid_otp_channel", INVALID_OTP_CHANNEL),
            Map.entry("send_otp_failed", ErrorConstants.SEND_OTP_FAILED),
            Map.entry("invalid_no_of_challenges", INVALID_NO_OF_CHALLENGES),
            Map.entry("invalid_auth_factor_type", ErrorConstants.INVALID_AUTH_FACTOR_TYPE),
            Map.entry("invalid_bind_auth_factor_type", ErrorConstants.INVALID_AUTH_FACTOR_TYPE),
            Map.entry("invalid_challenge_format", ErrorConstants.INVALID_CHALLENGE_FORMAT),
            Map.entry("invalid_challenge", ErrorConstants.INVALID_CHALLENGE),
            Map.entry("invalid_public_key", INVALID_PUBLIC_KEY),
            Map.entry("duplicate_public_key", DUPLICATE_PUBLIC_KEY),
            // IdaKeyBinderImpl answers binding_auth_failed when the identity system refuses the challenge.
            Map.entry("auth_failed", ErrorConstants.BINDING_AUTH_FAILED),
            // eSignet's HeaderValidationFilter answers no_attempts_left when an individual's attempts run out.
            Map.entry("too_many_attempts", NO_ATTEMPTS_LEFT),
            Map.entry("required_header_missing", REQUIRED_HEADER_MISSING),
            Map.entry("invalid_request", ErrorConstants.INVALID_REQUEST),
            Map.entry("key_binding_failed", ErrorConstants.KEY_BINDING_FAILED));

    /** VerifyWalletToken's reasons for validateBindingAuth (KycAuthException). */
    private static final Map<String, String> WLA = Map.ofEntries(
            // BindingValidatorServiceImpl finds no unexpired registry entry: binding_not_found. A revoked,
            // expired or never-made binding, and an ID nobody bound, are all that case.
            Map.entry("binding_not_found", KEY_BINDING_NOT_FOUND),
            Map.entry("binding_expired", KEY_BINDING_NOT_FOUND),
            Map.entry("binding_revoked", KEY_BINDING_NOT_FOUND),
            Map.entry("invalid_individual_id", KEY_BINDING_NOT_FOUND),
            Map.entry("sha256_thumbprint_header_missing", SHA256_THUMBPRINT_HEADER_MISSING),
            // Everything Nimbus' DefaultJWTProcessor refuses in BindingValidatorServiceImpl is invalid_wla_token:
            // signature (a superseded key's token fails against the current certificate there), alg, claims, time.
            Map.entry("binding_superseded", INVALID_WLA_TOKEN),
            Map.entry("sha256_thumbprint_mismatch", INVALID_WLA_TOKEN),
            Map.entry("invalid_wla_token", INVALID_WLA_TOKEN),
            Map.entry("invalid_token_algorithm", INVALID_WLA_TOKEN),
            Map.entry("invalid_token_signature", INVALID_WLA_TOKEN),
            Map.entry("invalid_token_audience", INVALID_WLA_TOKEN),
            Map.entry("invalid_token_subject", INVALID_WLA_TOKEN),
            Map.entry("token_expired", INVALID_WLA_TOKEN),
            Map.entry("token_not_yet_valid", INVALID_WLA_TOKEN),
            Map.entry("token_lifetime_too_long", INVALID_WLA_TOKEN),
            Map.entry("token_replayed", INVALID_WLA_TOKEN),
            Map.entry("too_many_attempts", NO_ATTEMPTS_LEFT));

    private EsignetCodes() {}

    /** The code sendBindingOtp throws: send_otp_failed for anything without a code of its own. */
    static String forSendOtp(RpcFailure failure) {
        return binding(failure, ErrorConstants.SEND_OTP_FAILED);
    }

    /** The code doKeyBinding throws: key_binding_failed for anything without a code of its own. */
    static String forKeyBinding(RpcFailure failure) {
        return binding(failure, ErrorConstants.KEY_BINDING_FAILED);
    }

    /** The code validateBindingAuth throws: auth_failed (KycAuthException's default) when the check itself failed. */
    static String forWla(RpcFailure failure) {
        if (failure.transport() || failure.reason == null) {
            return ErrorConstants.AUTH_FAILED;
        }
        return WLA.getOrDefault(failure.reason, ErrorConstants.AUTH_FAILED);
    }

    /**
     * Whether a failed binding call is the operator's to fix (logged as an error) rather than the user's
     * (a refusal): no answer, no reason, or a reason eSignet has no code for (a partner refused, ...).
     */
    static boolean operatorProblem(RpcFailure failure) {
        return failure.transport() || failure.reason == null || !BINDING.containsKey(failure.reason)
                || failure.reason.equals("key_binding_failed");
    }

    private static String binding(RpcFailure failure, String fallback) {
        // UNAVAILABLE / DEADLINE_EXCEEDED say nothing about the request: retryable, the operation's own code.
        if (failure.transport() || failure.reason == null) {
            return fallback;
        }
        String code = BINDING.get(failure.reason);
        if (code == null || code.equals(ErrorConstants.KEY_BINDING_FAILED)) {
            // invalid_partner, proof_of_possession_required, ...: the deployment is misconfigured, and the
            // wallet can do nothing about it; the log names the reason for the operator.
            return fallback;
        }
        return code;
    }
}
