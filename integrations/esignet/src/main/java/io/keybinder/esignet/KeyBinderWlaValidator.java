package io.keybinder.esignet;

import io.grpc.StatusRuntimeException;
import io.mosip.esignet.api.dto.AuthChallenge;
import io.mosip.esignet.api.dto.BindingAuthResult;
import io.mosip.esignet.api.exception.KycAuthException;
import io.mosip.esignet.api.spi.KeyBindingValidator;
import io.mosip.esignet.api.util.ErrorConstants;
import java.util.Collections;
import java.util.List;
import keybinder.v1.Keybinder;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.core.env.Environment;
import org.springframework.stereotype.Component;

/**
 * eSignet's {@link KeyBindingValidator} for wallet logins (WLA): each challenge is checked by KeyBinder's
 * VerifyWalletToken, which compares x5t#S256 with the active binding and accepts a token once.
 *
 * <p>Selected with {@code mosip.esignet.integration.binding-validator=KeyBinderWlaValidator}. eSignet
 * passes no headers here, so the check is made as the configured partner ({@code keybinder.grpc.partner-id}),
 * against the bindings that partner made.
 */
@ConditionalOnProperty(value = "mosip.esignet.integration.binding-validator", havingValue = "KeyBinderWlaValidator")
@Component
public class KeyBinderWlaValidator implements KeyBindingValidator, AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(KeyBinderWlaValidator.class);
    /** eSignet's factor and format for a wallet-local-authentication token (auth-challenge.WLA.format). */
    static final String WLA = "WLA";
    static final String JWT = "jwt";

    private final KeyBinderConnection connection;

    /** Spring injects eSignet's environment; the only constructor, so Spring autowires it. */
    public KeyBinderWlaValidator(Environment environment) {
        KeyBinderProperties properties = KeyBinderProperties.from(environment::getProperty);
        properties.requirePartnerCredential("eSignet passes no partner headers to the validator");
        this.connection = new KeyBinderConnection(properties);
    }

    @Override
    public BindingAuthResult validateBindingAuth(String transactionId, String individualId,
            List<AuthChallenge> challengeList) throws KycAuthException {
        if (challengeList == null || challengeList.isEmpty()) {
            throw new KycAuthException(ErrorConstants.INVALID_CHALLENGE, "no challenge");
        }
        for (AuthChallenge challenge : challengeList) {
            verify(individualId, challenge);
        }
        return new BindingAuthResult(transactionId, individualId);
    }

    private void verify(String individualId, AuthChallenge challenge) throws KycAuthException {
        if (challenge == null || !WLA.equals(challenge.getAuthFactorType())) {
            // KeyBinder vouches for wallet-bound keys only; eSignet's own validator knows no other factor either.
            throw new KycAuthException(EsignetCodes.UNBOUND_AUTH_FACTOR, "only WLA challenges are checked by KeyBinder");
        }
        if (!JWT.equals(challenge.getFormat())) {
            throw new KycAuthException(EsignetCodes.UNKNOWN_WLA_FORMAT, "a WLA challenge is a jwt");
        }
        KeyBinderConnection.Partner partner = connection.partner(Collections.emptyMap());
        Keybinder.VerifyWalletTokenRequest request = Keybinder.VerifyWalletTokenRequest.newBuilder()
                .setToken(challenge.getChallenge() == null ? "" : challenge.getChallenge())
                .setIndividualId(individualId == null ? "" : individualId)
                .setExpectedAudience(connection.properties.wlaAudience)
                .setBindAuthFactorType(WLA)
                .build();
        try {
            Keybinder.VerifyWalletTokenResponse response = connection.stub(partner).verifyWalletToken(request);
            log.info("validateBindingAuth for partner {}: valid, x5t#S256 {}", partner, response.getThumbprint());
        } catch (StatusRuntimeException err) {
            RpcFailure failure = RpcFailure.of(err);
            String code = EsignetCodes.forWla(failure);
            if (EsignetCodes.operatorProblem(failure)) {
                log.error("validateBindingAuth for partner {} failed: KeyBinder {} -> {}", partner, failure, code);
            } else {
                log.info("validateBindingAuth for partner {} refused: KeyBinder {} -> {}", partner, failure, code);
            }
            throw new KycAuthException(code, "KeyBinder: " + failure);
        }
    }

    /** Closes the channel; Spring calls it on shutdown (an AutoCloseable bean's inferred destroy method). */
    @Override
    public void close() {
        connection.close();
    }
}
