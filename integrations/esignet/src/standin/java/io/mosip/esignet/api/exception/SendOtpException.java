// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): it has no (code, message)
// constructor, unlike KeyBindingException. Never packaged.
package io.mosip.esignet.api.exception;

import io.mosip.esignet.api.util.ErrorConstants;

public class SendOtpException extends Exception {
    private String errorCode;

    public SendOtpException() {
        super(ErrorConstants.SEND_OTP_FAILED);
        this.errorCode = ErrorConstants.SEND_OTP_FAILED;
    }

    public SendOtpException(String errorCode) {
        super(errorCode);
        this.errorCode = errorCode;
    }

    public String getErrorCode() {
        return errorCode;
    }
}
