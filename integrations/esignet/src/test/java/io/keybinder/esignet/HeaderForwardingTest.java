package io.keybinder.esignet;

import static io.keybinder.esignet.TestSupport.environment;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;

import io.grpc.Grpc;
import io.grpc.InsecureServerCredentials;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.stub.StreamObserver;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import keybinder.v1.KeyBinderServiceGrpc;
import keybinder.v1.Keybinder;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/**
 * What the plugin puts on the wire, seen by a recording gRPC server in this JVM (a unit test above the
 * port: the real server's answers are tested in the other classes).
 */
@ExtendWith(LogCapture.class)
class HeaderForwardingTest {

    private final List<Map<String, String>> seen = new ArrayList<>();
    private Server server;
    private Path keyFile;

    @BeforeEach
    void start() throws Exception {
        KeyBinderServiceGrpc.KeyBinderServiceImplBase service = new KeyBinderServiceGrpc.KeyBinderServiceImplBase() {
            @Override
            public void getSupportedChallengeFormats(Keybinder.GetSupportedChallengeFormatsRequest request,
                    StreamObserver<Keybinder.GetSupportedChallengeFormatsResponse> response) {
                response.onNext(Keybinder.GetSupportedChallengeFormatsResponse.newBuilder()
                        .addFormats("alpha-numeric").build());
                response.onCompleted();
            }

            @Override
            public void sendBindingOtp(Keybinder.SendBindingOtpRequest request,
                    StreamObserver<Keybinder.SendBindingOtpResponse> response) {
                response.onNext(Keybinder.SendBindingOtpResponse.newBuilder().setTransactionId("t").build());
                response.onCompleted();
            }
        };
        ServerInterceptor record = new ServerInterceptor() {
            @Override
            public <Q, R> ServerCall.Listener<Q> interceptCall(ServerCall<Q, R> call, Metadata headers,
                    ServerCallHandler<Q, R> next) {
                Map<String, String> copy = new HashMap<>();
                for (String key : headers.keys()) {
                    if (!key.endsWith(Metadata.BINARY_HEADER_SUFFIX)) {
                        copy.put(key, headers.get(Metadata.Key.of(key, Metadata.ASCII_STRING_MARSHALLER)));
                    }
                }
                synchronized (seen) {
                    seen.add(copy);
                }
                return next.startCall(call, headers);
            }
        };
        server = Grpc.newServerBuilderForPort(0, InsecureServerCredentials.create())
                .addService(ServerInterceptors.intercept(service, record)).build().start();
        keyFile = Files.createTempFile("partner", ".key");
        Files.writeString(keyFile, "kb_configured_key_0123456789\n");
        TestSupport.Secrets.add("kb_configured_key_0123456789");
    }

    @AfterEach
    void stop() throws Exception {
        server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        Files.deleteIfExists(keyFile);
    }

    private Map<String, String> properties() {
        Map<String, String> p = new HashMap<>();
        p.put("keybinder.grpc.target", "127.0.0.1:" + server.getPort());
        p.put("keybinder.grpc.plaintext", "true");
        p.put("keybinder.grpc.partner-id", "configured-wallet");
        p.put("keybinder.grpc.partner-api-key-source", "file:" + keyFile);
        return p;
    }

    @Test
    void onlyThePartnerHeadersAreForwardedWhateverTheirCase() throws Exception {
        Map<String, String> headers = new LinkedHashMap<>();
        headers.put("PARTNER-ID", "wallet-x");
        headers.put("Partner-Api-Key", "kb_from_the_request_0123456789");
        headers.put("Authorization", "Bearer secret-token-of-the-wallet");
        headers.put("Cookie", "session=abc");
        headers.put("x-request-id", "r1");
        TestSupport.Secrets.add("kb_from_the_request_0123456789");
        TestSupport.Secrets.add("wallet-x");  // not a secret, but a header value: never logged either
        TestSupport.Secrets.add("secret-token-of-the-wallet");
        try (KeyBinderGrpcBinder binder = new KeyBinderGrpcBinder(environment(properties()))) {
            binder.sendBindingOtp("1234567890", List.of("email"), headers);
        }
        Map<String, String> wire = seen.get(seen.size() - 1);
        assertEquals("wallet-x", wire.get("partner-id"));
        assertEquals("kb_from_the_request_0123456789", wire.get("partner-api-key"));
        assertNull(wire.get("authorization"));
        assertNull(wire.get("cookie"));
        assertNull(wire.get("x-request-id"));
    }

    @Test
    void withoutHeadersTheConfiguredPartnerIsUsed() throws Exception {
        try (KeyBinderGrpcBinder binder = new KeyBinderGrpcBinder(environment(properties()))) {
            binder.sendBindingOtp("1234567890", List.of("email"), Map.of());
            Map<String, String> wire = seen.get(seen.size() - 1);
            assertEquals("configured-wallet", wire.get("partner-id"));
            assertEquals("kb_configured_key_0123456789", wire.get("partner-api-key"));

            // The configured partner named in a header without a key gets the configured key; another does not.
            binder.sendBindingOtp("1234567890", List.of("email"), Map.of("partner-id", "configured-wallet"));
            assertEquals("kb_configured_key_0123456789", seen.get(seen.size() - 1).get("partner-api-key"));
            binder.sendBindingOtp("1234567890", List.of("email"), Map.of("partner-id", "wallet-y"));
            assertEquals("wallet-y", seen.get(seen.size() - 1).get("partner-id"));
            assertFalse(seen.get(seen.size() - 1).containsKey("partner-api-key"));
        }
    }

    @Test
    void formatsAreCachedForTheConfiguredTime() throws Exception {
        try (KeyBinderGrpcBinder cached = new KeyBinderGrpcBinder(environment(properties()))) {
            for (int i = 0; i < 5; i++) {
                assertEquals(List.of("alpha-numeric"), cached.getSupportedChallengeFormats("OTP"));
            }
        }
        assertEquals(1, seen.size(), "one call for five questions");
        assertEquals("configured-wallet", seen.get(0).get("partner-id"));

        Map<String, String> uncached = properties();
        uncached.put("keybinder.grpc.formats-cache-seconds", "0");
        try (KeyBinderGrpcBinder binder = new KeyBinderGrpcBinder(environment(uncached))) {
            binder.getSupportedChallengeFormats("OTP");
            binder.getSupportedChallengeFormats("OTP");
        }
        assertEquals(3, seen.size());
    }

    @Test
    void closingIsIdempotent() {
        KeyBinderGrpcBinder binder = new KeyBinderGrpcBinder(environment(properties()));
        binder.close();
        binder.close();
    }
}
