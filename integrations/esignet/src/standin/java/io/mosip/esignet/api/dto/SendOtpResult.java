// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): Lombok @Data @AllArgsConstructor
// @NoArgsConstructor.
package io.mosip.esignet.api.dto;

public class SendOtpResult {
    private String transactionId;
    private String maskedEmail;
    private String maskedMobile;

    public SendOtpResult() {}

    public SendOtpResult(String transactionId, String maskedEmail, String maskedMobile) {
        this.transactionId = transactionId;
        this.maskedEmail = maskedEmail;
        this.maskedMobile = maskedMobile;
    }

    public String getTransactionId() { return transactionId; }
    public void setTransactionId(String transactionId) { this.transactionId = transactionId; }
    public String getMaskedEmail() { return maskedEmail; }
    public void setMaskedEmail(String maskedEmail) { this.maskedEmail = maskedEmail; }
    public String getMaskedMobile() { return maskedMobile; }
    public void setMaskedMobile(String maskedMobile) { this.maskedMobile = maskedMobile; }
}
