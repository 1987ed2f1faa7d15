package io.keybinder.esignet;

import static io.keybinder.esignet.TestSupport.challenge;
import static io.keybinder.esignet.TestSupport.environment;
import static io.keybinder.esignet.TestSupport.headers;
import static io.keybinder.esignet.TestSupport.serverProperties;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.mosip.esignet.api.dto.BindingAuthResult;
import io.mosip.esignet.api.exception.KycAuthException;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/** Wallet logins (WLA) through KeyBinderWlaValidator, as eSignet's authenticate step calls it. */
@ExtendWith(LogCapture.class)
class WlaLoginTest {

    static KeyBinderGrpcBinder binder;
    static KeyBinderWlaValidator validator;
    static final TestSupport.Person BOB = TestSupport.person("wla");
    static final TestSupport.Person CAROL = TestSupport.person("supersede");

    @BeforeAll
    static void start() {
        binder = new KeyBinderGrpcBinder(environment(serverProperties()));
        validator = new KeyBinderWlaValidator(environment(serverProperties()));
    }

    @AfterAll
    static void stop() {
        binder.close();
        validator.close();
    }

    private static KycAuthException refused(String individualId, String factor, String format, String token) {
        return assertThrows(KycAuthException.class, () -> validator.validateBindingAuth(UUID.randomUUID().toString(),
                individualId, List.of(challenge(factor, format, token))));
    }

    /** Needs the server's eSignet WLA profile for the partner (issue 11): until then KeyBinder refuses no-jti tokens. */
    @Test
    void injiTokenIsAcceptedOnceThenRefusedAsReplayed() throws Exception {
        BindingFlowTest.Bound bound = BindingFlowTest.bind(binder, BOB, headers());
        String token = TestSupport.injiToken(BOB.id(), bound.thumbprint(), bound.wallet().getPrivate());
        assertTrue(token.length() >= 500 && token.length() <= 1000, "within eSignet's WLA length limits");
        String transactionId = UUID.randomUUID().toString();

        BindingAuthResult result = validator.validateBindingAuth(transactionId, BOB.id(),
                List.of(challenge("WLA", "jwt", token)));
        assertEquals(transactionId, result.getTransactionId());
        assertEquals(BOB.id(), result.getIndividualId());

        KycAuthException replay = refused(BOB.id(), "WLA", "jwt", token);
        assertEquals("invalid_wla_token", replay.getErrorCode());
        assertTrue(replay.getMessage().contains("token_replayed"), replay.getMessage());
    }

    @Test
    void aSupersededKeysTokenIsRefusedWithEsignetsCode() throws Exception {
        BindingFlowTest.Bound first = BindingFlowTest.bind(binder, CAROL, headers());
        BindingFlowTest.Bound second = BindingFlowTest.bind(binder, CAROL, headers());
        // The current key is accepted (with a token every profile takes) ...
        validator.validateBindingAuth("t1", CAROL.id(), List.of(challenge("WLA", "jwt",
                TestSupport.shortToken(CAROL.id(), second.thumbprint(), second.wallet().getPrivate()))));
        // ... the superseded one is not: eSignet's code, KeyBinder's reason in the message.
        KycAuthException old = refused(CAROL.id(), "WLA", "jwt",
                TestSupport.shortToken(CAROL.id(), first.thumbprint(), first.wallet().getPrivate()));
        assertEquals("invalid_wla_token", old.getErrorCode());
        assertTrue(old.getMessage().contains("binding_superseded"), old.getMessage());
    }

    @Test
    void everyRefusalHasEsignetsCode() throws Exception {
        BindingFlowTest.Bound bound = BindingFlowTest.bind(binder, CAROL, headers());
        String good = TestSupport.shortToken(CAROL.id(), bound.thumbprint(), bound.wallet().getPrivate());

        KycAuthException noThumbprint = refused(CAROL.id(), "WLA", "jwt",
                TestSupport.shortToken(CAROL.id(), null, bound.wallet().getPrivate()));
        assertEquals("sha256_thumbprint_header_missing", noThumbprint.getErrorCode());

        assertEquals("unknown_wla_format", refused(CAROL.id(), "WLA", "jws", good).getErrorCode());
        assertEquals("unbound_auth_factor", refused(CAROL.id(), "PIN", "number", "123456").getErrorCode());
        assertEquals("invalid_wla_token", refused(CAROL.id(), "WLA", "jwt", "not.a.token").getErrorCode());

        // Someone nobody bound: eSignet finds no registry entry.
        String stranger = String.valueOf(100_000_000_000L + (long) (Math.random() * 800_000_000_000L));
        KycAuthException unknown = refused(stranger, "WLA", "jwt", good);
        assertEquals("binding_not_found", unknown.getErrorCode());

        KycAuthException empty = assertThrows(KycAuthException.class,
                () -> validator.validateBindingAuth("t", CAROL.id(), List.of()));
        assertEquals("invalid_challenge", empty.getErrorCode());
    }

    @Test
    void theValidatorNeedsAConfiguredPartner() {
        Map<String, String> properties = new HashMap<>(serverProperties());
        properties.remove("keybinder.grpc.partner-api-key-source");
        IllegalStateException err = assertThrows(IllegalStateException.class,
                () -> new KeyBinderWlaValidator(environment(properties)));
        assertTrue(err.getMessage().contains("keybinder.grpc.partner-api-key-source"), err.getMessage());
    }
}
