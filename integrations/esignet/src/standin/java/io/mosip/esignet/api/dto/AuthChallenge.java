// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): the accessors Lombok's @Data
// generates there. Never packaged.
package io.mosip.esignet.api.dto;

public class AuthChallenge {
    private String authFactorType;
    private String challenge;
    private String format;

    public String getAuthFactorType() { return authFactorType; }
    public void setAuthFactorType(String authFactorType) { this.authFactorType = authFactorType; }
    public String getChallenge() { return challenge; }
    public void setChallenge(String challenge) { this.challenge = challenge; }
    public String getFormat() { return format; }
    public void setFormat(String format) { this.format = format; }
}
