package io.keybinder.esignet;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonIOException;
import io.grpc.StatusRuntimeException;
import io.mosip.esignet.api.dto.AuthChallenge;
import io.mosip.esignet.api.dto.KeyBindingResult;
import io.mosip.esignet.api.dto.SendOtpResult;
import io.mosip.esignet.api.exception.KeyBindingException;
import io.mosip.esignet.api.exception.SendOtpException;
import io.mosip.esignet.api.spi.KeyBinder;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import keybinder.v1.Keybinder;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.core.env.Environment;
import org.springframework.stereotype.Component;

/**
 * eSignet's {@link KeyBinder}, answered by a KeyBinder server over gRPC.
 *
 * <p>Selected with {@code mosip.esignet.integration.key-binder=KeyBinderGrpcBinder}; configured by
 * {@code keybinder.grpc.*} (README). Logs name the operation, the partner and KeyBinder's status and
 * reason; never an individual ID, OTP, PIN, token, key or header value.
 */
@ConditionalOnProperty(value = "mosip.esignet.integration.key-binder", havingValue = "KeyBinderGrpcBinder")
@Component
public class KeyBinderGrpcBinder implements KeyBinder, AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(KeyBinderGrpcBinder.class);
    private static final Gson JSON = new GsonBuilder().disableHtmlEscaping().create();

    private final KeyBinderConnection connection;
    private final Map<String, CachedFormats> formats = new ConcurrentHashMap<>();

    /**
     * Spring injects eSignet's environment; the properties are read once, here. The only constructor:
     * Spring autowires a single one without annotations.
     */
    public KeyBinderGrpcBinder(Environment environment) {
        KeyBinderProperties properties = KeyBinderProperties.from(environment::getProperty);
        properties.requirePartnerCredential("eSignet asks getSupportedChallengeFormats without headers");
        this.connection = new KeyBinderConnection(properties);
    }

    @Override
    public SendOtpResult sendBindingOtp(String individualId, List<String> otpChannels,
            Map<String, String> requestHeaders) throws SendOtpException {
        KeyBinderConnection.Partner partner = connection.partner(requestHeaders);
        Keybinder.SendBindingOtpRequest request = Keybinder.SendBindingOtpRequest.newBuilder()
                .setIndividualId(individualId == null ? "" : individualId)
                .addAllOtpChannels(otpChannels == null ? List.of() : otpChannels)
                .build();
        try {
            Keybinder.SendBindingOtpResponse response = connection.stub(partner).sendBindingOtp(request);
            log.info("sendBindingOtp for partner {}: sent", partner);
            return new SendOtpResult(response.getTransactionId(), response.getMaskedEmail(), response.getMaskedMobile());
        } catch (StatusRuntimeException err) {
            RpcFailure failure = RpcFailure.of(err);
            String code = EsignetCodes.forSendOtp(failure);
            logFailure("sendBindingOtp", partner, failure, code);
            throw new SendOtpException(code);
        }
    }

    @Override
    public KeyBindingResult doKeyBinding(String individualId, List<AuthChallenge> challengeList,
            Map<String, Object> publicKeyJWK, String bindAuthFactorType, Map<String, String> requestHeaders)
            throws KeyBindingException {
        KeyBinderConnection.Partner partner = connection.partner(requestHeaders);
        String jwk = jwkText(publicKeyJWK);
        Keybinder.DoKeyBindingRequest.Builder request = Keybinder.DoKeyBindingRequest.newBuilder()
                .setIndividualId(individualId == null ? "" : individualId)
                .setPublicKeyJwk(jwk)
                .setBindAuthFactorType(bindAuthFactorType == null ? "" : bindAuthFactorType);
        if (challengeList != null) {
            for (AuthChallenge challenge : challengeList) {
                if (challenge == null) {
                    continue;
                }
                request.addChallenges(Keybinder.AuthChallenge.newBuilder()
                        .setAuthFactorType(nullToEmpty(challenge.getAuthFactorType()))
                        .setFormat(nullToEmpty(challenge.getFormat()))
                        .setChallenge(nullToEmpty(challenge.getChallenge())));
            }
        }
        try {
            Keybinder.DoKeyBindingResponse response = connection.stub(partner).doKeyBinding(request.build());
            log.info("doKeyBinding for partner {}: bound, x5t#S256 {}", partner, response.getThumbprint());
            KeyBindingResult result = new KeyBindingResult();
            result.setCertificate(response.getCertificate());
            result.setPartnerSpecificUserToken(response.getPartnerSpecificUserToken());
            return result;
        } catch (StatusRuntimeException err) {
            RpcFailure failure = RpcFailure.of(err);
            String code = EsignetCodes.forKeyBinding(failure);
            logFailure("doKeyBinding", partner, failure, code);
            throw new KeyBindingException(code, failure.toString());
        }
    }

    /**
     * The JWK as JSON text, refused here when its type is one the deployment cannot carry: eSignet handles
     * RSA wallet keys only once the binder has answered, so an EC key bound at KeyBinder would be committed
     * there and then fail in eSignet.
     */
    private String jwkText(Map<String, Object> jwk) throws KeyBindingException {
        if (jwk == null || jwk.isEmpty()) {
            throw new KeyBindingException(EsignetCodes.INVALID_PUBLIC_KEY, "no public key");
        }
        WalletKeyType type = WalletKeyType.of(jwk);
        if (type == null) {
            throw new KeyBindingException(EsignetCodes.INVALID_PUBLIC_KEY, "unsupported key type (kty/crv)");
        }
        if (!connection.properties.allowedKeyTypes.contains(type.label)) {
            log.warn("doKeyBinding: refused a {} key before calling KeyBinder (allowed: {})", type.label,
                    connection.properties.allowedKeyTypes);
            throw new KeyBindingException(EsignetCodes.INVALID_PUBLIC_KEY, type.label + " keys are not accepted here"
                    + " (allowed: " + String.join(", ", connection.properties.allowedKeyTypes) + ")");
        }
        try {
            return JSON.toJson(jwk);
        } catch (JsonIOException | UnsupportedOperationException | IllegalArgumentException err) {
            throw new KeyBindingException(EsignetCodes.INVALID_PUBLIC_KEY, "the JWK cannot be written as JSON");
        }
    }

    /**
     * The formats KeyBinder accepts for a factor. eSignet asks once per challenge of every binding, without
     * headers: answers are cached for keybinder.grpc.formats-cache-seconds and asked as the configured
     * partner. When KeyBinder cannot be asked, a stale answer is better than none; with none, the list is
     * empty (eSignet then refuses the challenge with invalid_auth_factor_type_or_challenge_format).
     */
    @Override
    public List<String> getSupportedChallengeFormats(String authFactorType) {
        String factor = authFactorType == null ? "" : authFactorType;
        long now = System.nanoTime();
        CachedFormats cached = formats.get(factor);
        if (cached != null && now - cached.fetchedAt < connection.properties.formatsCacheTime.toNanos()) {
            return cached.formats;
        }
        KeyBinderConnection.Partner partner = connection.partner(Collections.emptyMap());
        try {
            List<String> answer = List.copyOf(connection.stub(partner).getSupportedChallengeFormats(
                    Keybinder.GetSupportedChallengeFormatsRequest.newBuilder().setAuthFactorType(factor).build())
                    .getFormatsList());
            formats.put(factor, new CachedFormats(answer, now));
            return answer;
        } catch (StatusRuntimeException err) {
            RpcFailure failure = RpcFailure.of(err);
            log.warn("getSupportedChallengeFormats({}) failed: {}; {}", factor, failure,
                    cached != null ? "answering the cached formats" : "answering none");
            return cached != null ? cached.formats : List.of();
        }
    }

    private static void logFailure(String operation, KeyBinderConnection.Partner partner, RpcFailure failure,
            String code) {
        if (EsignetCodes.operatorProblem(failure)) {
            log.error("{} for partner {} failed: KeyBinder {} -> {}", operation, partner, failure, code);
        } else {
            log.info("{} for partner {} refused: KeyBinder {} -> {}", operation, partner, failure, code);
        }
    }

    private static String nullToEmpty(String value) {
        return value == null ? "" : value;
    }

    /** Closes the channel; Spring calls it on shutdown (an AutoCloseable bean's inferred destroy method). */
    @Override
    public void close() {
        connection.close();
    }

    private static final class CachedFormats {
        final List<String> formats;
        final long fetchedAt;

        CachedFormats(List<String> formats, long fetchedAt) {
            this.formats = formats;
            this.fetchedAt = fetchedAt;
        }
    }
}
