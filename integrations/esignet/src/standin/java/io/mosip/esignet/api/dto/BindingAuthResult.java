// Compile-only stand-in for eSignet's esignet-integration-api (v1.8.0): Lombok @AllArgsConstructor @Data.
package io.mosip.esignet.api.dto;

public class BindingAuthResult {
    private String transactionId;
    private String individualId;

    public BindingAuthResult(String transactionId, String individualId) {
        this.transactionId = transactionId;
        this.individualId = individualId;
    }

    public String getTransactionId() { return transactionId; }
    public void setTransactionId(String transactionId) { this.transactionId = transactionId; }
    public String getIndividualId() { return individualId; }
    public void setIndividualId(String individualId) { this.individualId = individualId; }
}
