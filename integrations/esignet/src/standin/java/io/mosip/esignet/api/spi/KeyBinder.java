// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): same package, names and
// signatures. Never packaged; a production build compiles against the deployment's own jar.
package io.mosip.esignet.api.spi;

import io.mosip.esignet.api.dto.AuthChallenge;
import io.mosip.esignet.api.dto.KeyBindingResult;
import io.mosip.esignet.api.dto.SendOtpResult;
import io.mosip.esignet.api.exception.KeyBindingException;
import io.mosip.esignet.api.exception.SendOtpException;
import java.util.List;
import java.util.Map;

public interface KeyBinder {

    SendOtpResult sendBindingOtp(String individualId, List<String> otpChannels, Map<String, String> requestHeaders)
            throws SendOtpException;

    KeyBindingResult doKeyBinding(String individualId, List<AuthChallenge> challengeList,
            Map<String, Object> publicKeyJWK, String bindAuthFactorType, Map<String, String> requestHeaders)
            throws KeyBindingException;

    List<String> getSupportedChallengeFormats(String authFactorType);
}
