// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): same constructors and message
// shape ("<code> -> <message>"). Never packaged.
package io.mosip.esignet.api.exception;

import io.mosip.esignet.api.util.ErrorConstants;

public class KycAuthException extends Exception {
    private String errorCode;

    public KycAuthException() {
        super(ErrorConstants.AUTH_FAILED);
        this.errorCode = ErrorConstants.AUTH_FAILED;
    }

    public KycAuthException(String errorCode) {
        super(errorCode);
        this.errorCode = errorCode;
    }

    public KycAuthException(String errorCode, String errorMessage) {
        super(errorCode + " -> " + errorMessage);
        this.errorCode = errorCode;
    }

    public String getErrorCode() {
        return errorCode;
    }
}
