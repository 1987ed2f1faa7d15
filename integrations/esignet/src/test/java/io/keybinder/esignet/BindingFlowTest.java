package io.keybinder.esignet;

import static io.keybinder.esignet.TestSupport.challenge;
import static io.keybinder.esignet.TestSupport.environment;
import static io.keybinder.esignet.TestSupport.headers;
import static io.keybinder.esignet.TestSupport.jwk;
import static io.keybinder.esignet.TestSupport.otpFromOutbox;
import static io.keybinder.esignet.TestSupport.serverProperties;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.mosip.esignet.api.dto.KeyBindingResult;
import io.mosip.esignet.api.dto.SendOtpResult;
import java.security.KeyFactory;
import java.security.KeyPair;
import java.security.PublicKey;
import java.security.cert.X509Certificate;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.RSAPublicKeySpec;
import java.math.BigInteger;
import java.util.Base64;
import java.util.List;
import java.util.Map;
import keybinder.v1.Keybinder;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/** The binding exactly as eSignet's KeyBindingServiceImpl drives a KeyBinder plugin, against the real server. */
@ExtendWith(LogCapture.class)
class BindingFlowTest {

    static KeyBinderGrpcBinder binder;
    static final TestSupport.Person ALICE = TestSupport.person("binding");

    @BeforeAll
    static void start() {
        binder = new KeyBinderGrpcBinder(environment(serverProperties()));
    }

    @AfterAll
    static void stop() {
        binder.close();
    }

    /** One binding as eSignet makes it: formats check, OTP, doKeyBinding; returns the result and the key. */
    static Bound bind(KeyBinderGrpcBinder binder, TestSupport.Person person, Map<String, String> headers)
            throws Exception {
        // KeyBindingServiceImpl.validateChallengeListAuthFormat and the bind factor's format check.
        assertTrue(binder.getSupportedChallengeFormats("OTP").contains("alpha-numeric"));
        assertTrue(binder.getSupportedChallengeFormats("WLA").contains("jwt"));
        SendOtpResult sent = binder.sendBindingOtp(person.id(), List.of("email", "phone"), headers);
        String otp = otpFromOutbox(sent.getTransactionId());
        KeyPair wallet = TestSupport.rsaKeyPair();
        KeyBindingResult result = binder.doKeyBinding(person.id(),
                List.of(challenge("OTP", "alpha-numeric", otp)), jwk((RSAPublicKey) wallet.getPublic()), "WLA", headers);
        return new Bound(sent, otp, wallet, result, TestSupport.certificate(result.getCertificate()));
    }

    record Bound(SendOtpResult sent, String otp, KeyPair wallet, KeyBindingResult result, X509Certificate cert) {
        String thumbprint() throws Exception {
            return TestSupport.x5tS256(cert);
        }
    }

    @Test
    void formatsAreKeyBindersAndAnUnknownFactorHasNone() {
        assertEquals(List.of("alpha-numeric"), binder.getSupportedChallengeFormats("OTP"));
        assertEquals(List.of("number"), binder.getSupportedChallengeFormats("PIN"));
        assertEquals(List.of("jwt"), binder.getSupportedChallengeFormats("WLA"));
        assertEquals(List.of(), binder.getSupportedChallengeFormats("NOPE"));
    }

    @Test
    void bindsAnRsaWalletKeyAsEsignetDoes() throws Exception {
        Bound bound = bind(binder, ALICE, headers());

        // sendBindingOtp: a transaction id and the contacts masked, never in clear.
        assertFalse(bound.sent().getTransactionId().isBlank());
        String email = bound.sent().getMaskedEmail();
        String mobile = bound.sent().getMaskedMobile();
        assertTrue(email.contains("*") && !email.equals(ALICE.email()), "masked email: " + email);
        assertTrue(email.endsWith(ALICE.email().substring(ALICE.email().indexOf('@'))), "masked email keeps the domain");
        assertTrue(mobile.contains("*") && !mobile.equals(ALICE.phone()), "masked mobile: " + mobile);
        assertTrue(mobile.endsWith(ALICE.phone().substring(ALICE.phone().length() - 2)), "masked mobile keeps its end");

        // The certificate parses with the JCA, and its key is the wallet's JWK.
        X509Certificate cert = bound.cert();
        cert.checkValidity();
        RSAPublicKey wallet = (RSAPublicKey) bound.wallet().getPublic();
        Map<String, Object> jwk = jwk(wallet);
        PublicKey fromJwk = KeyFactory.getInstance("RSA").generatePublic(new RSAPublicKeySpec(
                new BigInteger(1, Base64.getUrlDecoder().decode((String) jwk.get("n"))),
                new BigInteger(1, Base64.getUrlDecoder().decode((String) jwk.get("e")))));
        assertEquals(fromJwk, cert.getPublicKey());
        assertEquals(wallet, cert.getPublicKey());

        // PSUT: non-empty, the certificate's subject, and eSignet's x5t#S256 of it is KeyBinder's thumbprint.
        String psut = bound.result().getPartnerSpecificUserToken();
        assertFalse(psut.isBlank());
        assertEquals("CN=" + psut, cert.getSubjectX500Principal().getName());
        String thumbprint = bound.thumbprint();
        try (TestSupport.RawClient raw = new TestSupport.RawClient()) {
            Keybinder.GetBindingResponse binding = raw.stub.getBinding(
                    Keybinder.GetBindingRequest.newBuilder().setThumbprint(thumbprint).build());
            assertEquals(Keybinder.BindingStatus.BINDING_STATUS_ACTIVE, binding.getStatus());
            assertEquals(thumbprint, binding.getThumbprint());
            assertEquals(psut, binding.getPartnerSpecificUserToken());
            assertEquals(cert, TestSupport.certificate(binding.getCertificate()));
        }
        // The plugin logged DoKeyBindingResponse.thumbprint: the same value.
        assertTrue(LogCapture.text().contains("bound, x5t#S256 " + thumbprint), "the response's thumbprint");

        // Stable for the partner: a new binding of the same person (headers absent: the configured partner).
        Bound again = bind(binder, ALICE, Map.of());
        assertEquals(psut, again.result().getPartnerSpecificUserToken());
        assertNotEquals(thumbprint, again.thumbprint());
    }
}
