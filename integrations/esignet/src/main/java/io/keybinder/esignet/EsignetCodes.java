package io.keybinder.esignet;

import io.mosip.esignet.api.util.ErrorConstants;
import java.util.Map;

/**
 * KeyBinder's reasons (google.rpc.ErrorInfo.reason) translated into the error codes eSignet passes on to
 * the wallet: the same name where eSignet has one, otherwise the code the server's eSignet table
 * (docs/esignet.md, "Error vocabulary") names. README "Error codes" gives the eSignet source of each.
 */
final class EsignetCodes {

    // esignet-core io.mosip.esignet.core.constants.ErrorConstants (v1.8.0): not in the plugin API jar,
    // so the values are repeated here.
    static final String INVALID_INDIVIDUAL_ID = "invalid_individual_id";
    static final String INVALID_OTP_CHANNEL = "invalid_otp_channel";
    static final String INVALID_NO_OF_CHALLENGES = "invalid_no_of_challenges";
    static final String INVALID_PUBLIC_KEY = "invalid_public_key";
    static final String DUPLICATE_PUBLIC_KEY = "duplicate_public_key";
    static final String INDIVIDUAL_ID_BLOCKED = "individual_id_blocked";
    static final String TOO_EARLY_ATTEMPT = "too_early_attempt";
    static final String UNKNOWN_ERROR = "unknown_error";
    static final String KEY_BINDING_NOT_FOUND = "binding_not_found";
    static final String UNBOUND_AUTH_FACTOR = "unbound_auth_factor";
    static final String INVALID_WLA_TOKEN = "invalid_wla_token";
    static final String SHA256_THUMBPRINT_HEADER_MISSING = "sha256_thumbprint_header_missing";
    static final String UNKNOWN_WLA_FORMAT = "unknown_wla_format";
    // mosip/esignet-plugins IdaKeyBinderImpl.REQUIRED_HEADERS_MISSING.
    static final String REQUIRED_HEADER_MISSING = "required_header_missing";

    static final String TOO_MANY_ATTEMPTS = "too_many_attempts";

    /** Reasons whose eSignet code does not depend on the operation. */
    private static final Map<String, String> CODES = Map.ofEntries(
            Map.entry("auth_failed", ErrorConstants.AUTH_FAILED),
            Map.entry("duplicate_public_key", DUPLICATE_PUBLIC_KEY),
            Map.entry("invalid_auth_factor_type", ErrorConstants.INVALID_AUTH_FACTOR_TYPE),
            Map.entry("invalid_bind_auth_factor_type", ErrorConstants.INVALID_AUTH_FACTOR_TYPE),
            Map.entry("invalid_challenge", ErrorConstants.INVALID_CHALLENGE),
            Map.entry("invalid_challenge_format", ErrorConstants.INVALID_CHALLENGE_FORMAT),
            Map.entry("invalid_individual_id", INVALID_INDIVIDUAL_ID),
            Map.entry("invalid_no_of_challenges", INVALID_NO_OF_CHALLENGES),
            Map.entry("invalid_otp_channel", INVALID_OTP_CHANNEL),
            Map.entry("invalid_public_key", INVALID_PUBLIC_KEY),
            Map.entry("invalid_request", ErrorConstants.INVALID_REQUEST),
            Map.entry("invalid_revocation_reason", ErrorConstants.INVALID_REQUEST),
            Map.entry("required_header_missing", REQUIRED_HEADER_MISSING),
            Map.entry("send_otp_failed", ErrorConstants.SEND_OTP_FAILED),
            // A binding eSignet would no longer find (it looks only for unexpired registry entries and has
            // no revocation): binding_not_found.
            Map.entry("binding_not_found", KEY_BINDING_NOT_FOUND),
            Map.entry("binding_expired", KEY_BINDING_NOT_FOUND),
            Map.entry("binding_revoked", KEY_BINDING_NOT_FOUND),
            Map.entry("sha256_thumbprint_header_missing", SHA256_THUMBPRINT_HEADER_MISSING),
            // eSignet has one code for every token its Nimbus processor refuses; a superseded key's token
            // fails there because eSignet replaced the key in place.
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
            Map.entry("token_replayed", INVALID_WLA_TOKEN));

    private EsignetCodes() {}

    /** sendBindingOtp: too_early_attempt for a rate limit (eSignet's resend code); else send_otp_failed. */
    static String forSendOtp(RpcFailure failure) {
        return map(failure, TOO_EARLY_ATTEMPT, ErrorConstants.SEND_OTP_FAILED);
    }

    /** doKeyBinding: individual_id_blocked for a lockout; else key_binding_failed. */
    static String forKeyBinding(RpcFailure failure) {
        return map(failure, INDIVIDUAL_ID_BLOCKED, ErrorConstants.KEY_BINDING_FAILED);
    }

    /** validateBindingAuth: individual_id_blocked for a lockout; else unknown_error (eSignet's answer to a fault). */
    static String forWla(RpcFailure failure) {
        return map(failure, INDIVIDUAL_ID_BLOCKED, UNKNOWN_ERROR);
    }

    /**
     * Whether a failure is the operator's to fix (logged as an error) rather than the user's (a refusal):
     * no answer, no reason, or a reason eSignet has no code for (a refused partner, a proof of possession
     * the partner's policy requires, key_binding_failed).
     */
    static boolean operatorProblem(RpcFailure failure) {
        return failure.transport() || failure.reason == null
                || !(CODES.containsKey(failure.reason) || failure.reason.equals(TOO_MANY_ATTEMPTS));
    }

    private static String map(RpcFailure failure, String tooManyAttempts, String fault) {
        // UNAVAILABLE / DEADLINE_EXCEEDED say nothing about the request: retryable, the operation's fault code.
        if (failure.transport() || failure.reason == null) {
            return fault;
        }
        if (failure.reason.equals(TOO_MANY_ATTEMPTS)) {
            return tooManyAttempts;
        }
        // invalid_partner, proof_of_possession_required, invalid_proof_of_possession, key_binding_failed and
        // any reason a newer server adds: the wallet can do nothing about them; the log names the reason.
        return CODES.getOrDefault(failure.reason, fault);
    }
}
