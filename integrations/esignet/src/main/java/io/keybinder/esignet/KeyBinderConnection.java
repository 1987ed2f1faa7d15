package io.keybinder.esignet;

import io.grpc.ChannelCredentials;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.io.IOException;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import keybinder.v1.KeyBinderServiceGrpc;
import keybinder.v1.KeyBinderServiceGrpc.KeyBinderServiceBlockingStub;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * One gRPC channel to KeyBinder, the partner credential and the per-call deadline; closed with the plugin.
 *
 * <p>The channel is built through {@link Grpc#newChannelBuilder} with transport-neutral credentials, so
 * the same code runs on grpc-netty-shaded (the production pom) and on Debian's grpc-netty (the tests).
 */
final class KeyBinderConnection implements AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(KeyBinderConnection.class);
    static final String PARTNER_ID = "partner-id";
    static final String PARTNER_API_KEY = "partner-api-key";
    private static final Metadata.Key<String> PARTNER_ID_KEY =
            Metadata.Key.of(PARTNER_ID, Metadata.ASCII_STRING_MARSHALLER);
    private static final Metadata.Key<String> PARTNER_API_KEY_KEY =
            Metadata.Key.of(PARTNER_API_KEY, Metadata.ASCII_STRING_MARSHALLER);

    final KeyBinderProperties properties;
    private final ManagedChannel channel;
    private final KeyBinderServiceBlockingStub stub;

    KeyBinderConnection(KeyBinderProperties properties) {
        this.properties = properties;
        this.channel = Grpc.newChannelBuilder(properties.target, credentials(properties)).build();
        this.stub = KeyBinderServiceGrpc.newBlockingStub(channel);
        if (properties.plaintext && !loopback(properties.target)) {
            log.warn("KeyBinder channel to {} is plaintext: the partner API key and every OTP cross the network"
                    + " in clear unless a TLS sidecar carries them", properties.target);
        }
        log.info("KeyBinder channel to {} ({}), deadline {} ms", properties.target,
                properties.plaintext ? "plaintext" : properties.clientCertFile != null ? "mTLS" : "TLS",
                properties.deadline.toMillis());
    }

    private static boolean loopback(String target) {
        String host = target.replaceFirst("^dns:/*", "").replaceFirst(":[0-9]+$", "").replaceAll("[\\[\\]]", "");
        return host.equals("localhost") || host.startsWith("127.") || host.equals("::1");
    }

    private static ChannelCredentials credentials(KeyBinderProperties p) {
        if (p.plaintext) {
            return InsecureChannelCredentials.create();
        }
        TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder();
        try {
            if (p.caFile != null) {
                tls.trustManager(p.caFile.toFile());
            }
            if (p.clientCertFile != null) {
                tls.keyManager(p.clientCertFile.toFile(), p.clientKeyFile.toFile());
            }
        } catch (IOException err) {
            throw new IllegalStateException(KeyBinderProperties.PREFIX + "ca-file / client-cert-file / client-key-file:"
                    + " cannot load (" + err.getClass().getSimpleName() + "): check they are PEM files");
        }
        return tls.build();
    }

    /** Which partner a call is made for, from eSignet's request headers or the configured credential. */
    static final class Partner {
        final String id;
        final String apiKey;
        private final boolean fromHeaders;

        Partner(String id, String apiKey, boolean fromHeaders) {
            this.id = id;
            this.apiKey = apiKey;
            this.fromHeaders = fromHeaders;
        }

        /** For logs: the configured partner's id (configuration, not a request value); never a header value or key. */
        @Override
        public String toString() {
            return fromHeaders ? "(from the request headers)" : id;
        }
    }

    /**
     * The partner of a call: eSignet's {@code partner-id} (and {@code partner-api-key}) header when present,
     * matched case-insensitively; otherwise the configured credential. Nothing else of the headers is used.
     * A header partner without a key gets the configured key only if it is the configured partner.
     */
    Partner partner(Map<String, String> requestHeaders) {
        String id = null;
        String key = null;
        if (requestHeaders != null) {
            for (Map.Entry<String, String> header : requestHeaders.entrySet()) {
                if (header.getKey() == null || header.getValue() == null || header.getValue().isBlank()) {
                    continue;
                }
                String name = header.getKey().trim().toLowerCase(Locale.ROOT);
                if (name.equals(PARTNER_ID)) {
                    id = header.getValue().trim();
                } else if (name.equals(PARTNER_API_KEY)) {
                    key = header.getValue().trim();
                }
            }
        }
        if (id == null) {
            return new Partner(properties.partnerId, properties.partnerApiKey, false);
        }
        if (key == null && id.equals(properties.partnerId)) {
            key = properties.partnerApiKey;
        }
        return new Partner(id, key, true);
    }

    /** The stub for one call: the partner's metadata and a fresh deadline. */
    KeyBinderServiceBlockingStub stub(Partner partner) {
        Metadata headers = new Metadata();
        if (partner.id != null) {
            headers.put(PARTNER_ID_KEY, partner.id);
        }
        if (partner.apiKey != null) {
            headers.put(PARTNER_API_KEY_KEY, partner.apiKey);
        }
        return stub.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
                .withDeadlineAfter(properties.deadline.toMillis(), TimeUnit.MILLISECONDS);
    }

    /** Idempotent; waits briefly for calls in flight (eSignet closes beans on shutdown). */
    @Override
    public void close() {
        if (channel.isShutdown()) {
            return;
        }
        channel.shutdown();
        try {
            if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
                channel.shutdownNow();
            }
        } catch (InterruptedException err) {
            channel.shutdownNow();
            Thread.currentThread().interrupt();
        }
    }
}
