// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): same constructors and message
// shape ("<code> -> <message>"). Never packaged.
package io.mosip.esignet.api.exception;

import io.mosip.esignet.api.util.ErrorConstants;

public class KeyBindingException extends Exception {
    private String errorCode;

    public KeyBindingException() {
        super(ErrorConstants.KEY_BINDING_FAILED);
        this.errorCode = ErrorConstants.KEY_BINDING_FAILED;
    }

    public KeyBindingException(String errorCode) {
        super(errorCode);
        this.errorCode = errorCode;
    }

    public KeyBindingException(String errorCode, String errorMessage) {
        super(errorCode + " -> " + errorMessage);
        this.errorCode = errorCode;
    }

    public String getErrorCode() {
        return errorCode;
    }
}
