// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): Lombok @Data.
package io.mosip.esignet.api.dto;

public class KeyBindingResult {
    private String certificate;
    private String partnerSpecificUserToken;

    public String getCertificate() { return certificate; }
    public void setCertificate(String certificate) { this.certificate = certificate; }
    public String getPartnerSpecificUserToken() { return partnerSpecificUserToken; }
    public void setPartnerSpecificUserToken(String partnerSpecificUserToken) {
        this.partnerSpecificUserToken = partnerSpecificUserToken;
    }
}
