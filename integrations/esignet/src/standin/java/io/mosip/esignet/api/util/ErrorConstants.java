// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0) ErrorConstants: the values
// as there. Never packaged.
package io.mosip.esignet.api.util;

public class ErrorConstants {
    public static final String AUTH_FAILED = "auth_failed";
    public static final String DATA_EXCHANGE_FAILED = "data_exchange_failed";
    public static final String SEND_OTP_FAILED = "send_otp_failed";
    public static final String KEY_BINDING_FAILED = "key_binding_failed";
    public static final String KYC_SIGNING_CERTIFICATE_FAILED = "kyc_signing_certificate_failed";
    public static final String INVALID_AUTH_FACTOR_TYPE = "invalid_auth_factor_type";
    public static final String INVALID_CHALLENGE = "invalid_challenge";
    public static final String INVALID_CHALLENGE_FORMAT = "invalid_challenge_format";
    public static final String INVALID_AUTH_FACTOR_TYPE_FORMAT = "invalid_auth_factor_type_format";
    public static final String BINDING_AUTH_FAILED = "binding_auth_failed";
    public static final String VCI_EXCHANGE_FAILED = "vci_exchange_failed";
    public static final String NOT_IMPLEMENTED = "not_implemented";
    public static final String INVALID_CHALLENGE_LENGTH = "invalid_challenge_length";
    public static final String INVALID_CLAIMS = "invalid_claims";
    public static final String INVALID_TRUST_FRAMEWORK = "invalid_trust_framework";
    public static final String INVALID_EVIDENCE_TYPE = "invalid_evidence_type";
    public static final String INVALID_PURPOSE = "invalid_purpose";
    public static final String KBI_SPEC_NOT_FOUND = "kbi_spec_not_found";
    public static final String KBI_SCHEMA_PARSE_ERROR = "kbi_schema_parse_error";
    public static final String INVALID_REQUEST = "invalid_request";
}
