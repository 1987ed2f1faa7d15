package io.keybinder.esignet;

import com.google.gson.Gson;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.grpc.ChannelCredentials;
import io.grpc.Grpc;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import io.mosip.esignet.api.dto.AuthChallenge;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.lang.reflect.InvocationHandler;
import java.lang.reflect.Proxy;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.Signature;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.interfaces.ECPublicKey;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.ECGenParameterSpec;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import keybinder.v1.KeyBinderServiceGrpc;
import org.springframework.core.env.Environment;

/**
 * What the pytest driver (tests/test_esignet_plugin.py) hands the Java tests, through the environment
 * (never argv: the partner key is in a file): the running `keybinder serve`, its TLS material, the
 * partner, the enrolled individuals and the outbox the OTPs go to.
 */
final class TestSupport {

    static final Gson GSON = new Gson();
    static final Base64.Encoder B64URL = Base64.getUrlEncoder().withoutPadding();

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null || value.isBlank()) {
            throw new IllegalStateException(name + " is not set: run these tests through tests/test_esignet_plugin.py");
        }
        return value;
    }

    static final String TARGET = env("KEYBINDER_TEST_TARGET");
    static final String CA_FILE = env("KEYBINDER_TEST_CA_FILE");
    static final String CLIENT_CERT = env("KEYBINDER_TEST_CLIENT_CERT");
    static final String CLIENT_KEY = env("KEYBINDER_TEST_CLIENT_KEY");
    static final String PARTNER_ID = env("KEYBINDER_TEST_PARTNER_ID");
    static final Path PARTNER_KEY_FILE = Path.of(env("KEYBINDER_TEST_PARTNER_API_KEY_FILE"));
    static final Path OUTBOX = Path.of(env("KEYBINDER_TEST_OUTBOX"));
    /** "esignet" when the server runs the partner under eSignet's WLA profile (issue 11), else "strict". */
    static final String WLA_PROFILE = env("KEYBINDER_TEST_WLA_PROFILE");
    /** The server limits the partner to RSA keys (allowed_key_types_by_partner, issue 11). */
    static final boolean SERVER_RSA_ONLY = Boolean.parseBoolean(env("KEYBINDER_TEST_SERVER_RSA_ONLY"));

    static String partnerApiKey() {
        try {
            String key = Files.readString(PARTNER_KEY_FILE).trim();
            Secrets.add(key);
            return key;
        } catch (IOException err) {
            throw new IllegalStateException("cannot read the partner key file", err);
        }
    }

    /** An individual enrolled by the driver: id, email, phone. */
    record Person(String id, String email, String phone) {}

    /** Individuals by role: each test class binds its own, so supersede and replay stay local to it. */
    static Person person(String role) {
        try {
            JsonObject all = JsonParser.parseString(Files.readString(Path.of(env("KEYBINDER_TEST_PEOPLE"))))
                    .getAsJsonObject();
            JsonObject p = all.getAsJsonObject(role);
            if (p == null) {
                throw new IllegalStateException("no enrolled individual for role " + role);
            }
            Person person = new Person(p.get("individual_id").getAsString(), p.get("email").getAsString(),
                    p.get("phone").getAsString());
            Secrets.add(person.id());
            return person;
        } catch (IOException err) {
            throw new IllegalStateException("cannot read KEYBINDER_TEST_PEOPLE", err);
        }
    }

    /**
     * eSignet's Spring environment, as the plugin sees it: a property map. A proxy, so that it compiles
     * against the stand-in and against the real (much larger) Environment interface alike.
     */
    static Environment environment(Map<String, String> properties) {
        InvocationHandler handler = (proxy, method, args) -> {
            if (method.getName().equals("getProperty") && args != null && args.length >= 1
                    && args[0] instanceof String key) {
                String value = properties.get(key);
                return value == null && args.length == 2 && args[1] instanceof String fallback ? fallback : value;
            }
            if (method.getName().equals("toString") && args == null) {
                return "test environment " + properties.keySet();
            }
            throw new UnsupportedOperationException("the plugin only reads properties: " + method.getName());
        };
        return (Environment) Proxy.newProxyInstance(Environment.class.getClassLoader(),
                new Class<?>[] {Environment.class}, handler);
    }

    /** The plugin's properties for the test server: mTLS with the driver's CA, the partner key from its file. */
    static Map<String, String> serverProperties() {
        Map<String, String> p = new HashMap<>();
        p.put("keybinder.grpc.target", TARGET);
        p.put("keybinder.grpc.ca-file", CA_FILE);
        p.put("keybinder.grpc.client-cert-file", CLIENT_CERT);
        p.put("keybinder.grpc.client-key-file", CLIENT_KEY);
        p.put("keybinder.grpc.partner-id", PARTNER_ID);
        p.put("keybinder.grpc.partner-api-key-source", "file:" + PARTNER_KEY_FILE);
        p.put("keybinder.grpc.deadline-ms", "10000");
        return p;
    }

    static Map<String, String> headers() {
        // eSignet hands over HTTP headers as they came: any case, and more than the two the plugin forwards.
        Map<String, String> h = new LinkedHashMap<>();
        h.put("Partner-Id", PARTNER_ID);
        h.put("PARTNER-API-KEY", partnerApiKey());
        h.put("Authorization", "Bearer not-for-keybinder");
        return h;
    }

    /** A raw client of the test server, to look at what the plugin did (GetBinding). */
    static final class RawClient implements AutoCloseable {
        final ManagedChannel channel;
        final KeyBinderServiceGrpc.KeyBinderServiceBlockingStub stub;

        RawClient() throws IOException {
            ChannelCredentials creds = TlsChannelCredentials.newBuilder()
                    .trustManager(Path.of(CA_FILE).toFile())
                    .keyManager(Path.of(CLIENT_CERT).toFile(), Path.of(CLIENT_KEY).toFile())
                    .build();
            channel = Grpc.newChannelBuilder(TARGET, creds).build();
            Metadata md = new Metadata();
            md.put(Metadata.Key.of("partner-id", Metadata.ASCII_STRING_MARSHALLER), PARTNER_ID);
            md.put(Metadata.Key.of("partner-api-key", Metadata.ASCII_STRING_MARSHALLER), partnerApiKey());
            stub = KeyBinderServiceGrpc.newBlockingStub(channel)
                    .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md))
                    .withDeadlineAfter(10, TimeUnit.SECONDS);
        }

        @Override
        public void close() {
            channel.shutdownNow();
        }
    }

    /** The OTP the server's development notifier wrote for this transaction (as a person reads it on a phone). */
    static String otpFromOutbox(String transactionId) throws IOException, InterruptedException {
        long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (System.nanoTime() < until) {
            if (Files.exists(OUTBOX)) {
                for (String line : Files.readAllLines(OUTBOX, StandardCharsets.UTF_8)) {
                    if (line.isBlank()) {
                        continue;
                    }
                    JsonObject message = JsonParser.parseString(line).getAsJsonObject();
                    if (transactionId.equals(message.get("transaction_id").getAsString())) {
                        String otp = message.get("otp").getAsString();
                        Secrets.add(otp);
                        return otp;
                    }
                }
            }
            Thread.sleep(50);
        }
        throw new AssertionError("no OTP in the outbox for the transaction");
    }

    static AuthChallenge challenge(String factor, String format, String value) {
        AuthChallenge c = new AuthChallenge();
        c.setAuthFactorType(factor);
        c.setFormat(format);
        c.setChallenge(value);
        return c;
    }

    static KeyPair rsaKeyPair() throws GeneralSecurityException {
        KeyPairGenerator gen = KeyPairGenerator.getInstance("RSA");
        gen.initialize(2048);
        return gen.generateKeyPair();
    }

    static KeyPair ecKeyPair() throws GeneralSecurityException {
        KeyPairGenerator gen = KeyPairGenerator.getInstance("EC");
        gen.initialize(new ECGenParameterSpec("secp256r1"));
        return gen.generateKeyPair();
    }

    static String unsigned(BigInteger value, int length) {
        byte[] bytes = value.toByteArray();
        byte[] out = new byte[length];
        int copy = Math.min(bytes.length, length);
        System.arraycopy(bytes, bytes.length - copy, out, length - copy, copy);
        return B64URL.encodeToString(out);
    }

    /** The JWK map as eSignet's wallet-binding request carries it to the binder. */
    static Map<String, Object> jwk(RSAPublicKey key) {
        Map<String, Object> jwk = new LinkedHashMap<>();
        jwk.put("kty", "RSA");
        jwk.put("e", unsigned(key.getPublicExponent(), (key.getPublicExponent().bitLength() + 7) / 8));
        jwk.put("n", unsigned(key.getModulus(), (key.getModulus().bitLength() + 7) / 8));
        jwk.put("alg", "RS256");
        jwk.put("use", "sig");
        return jwk;
    }

    static Map<String, Object> jwk(ECPublicKey key) {
        Map<String, Object> jwk = new LinkedHashMap<>();
        jwk.put("kty", "EC");
        jwk.put("crv", "P-256");
        jwk.put("x", unsigned(key.getW().getAffineX(), 32));
        jwk.put("y", unsigned(key.getW().getAffineY(), 32));
        return jwk;
    }

    static X509Certificate certificate(String pem) throws GeneralSecurityException {
        return (X509Certificate) CertificateFactory.getInstance("X.509")
                .generateCertificate(new ByteArrayInputStream(pem.getBytes(StandardCharsets.US_ASCII)));
    }

    /** x5t#S256 as eSignet computes it (jose4j X509Util.x5tS256): base64url SHA-256 of the DER, no padding. */
    static String x5tS256(X509Certificate cert) throws GeneralSecurityException {
        return B64URL.encodeToString(MessageDigest.getInstance("SHA-256").digest(cert.getEncoded()));
    }

    /** A compact RS256 JWS, signed here with the wallet's private key as Inji signs its WLA token. */
    static String rs256(Map<String, Object> header, Map<String, Object> claims, PrivateKey key)
            throws GeneralSecurityException {
        String signingInput = B64URL.encodeToString(GSON.toJson(header).getBytes(StandardCharsets.UTF_8)) + "."
                + B64URL.encodeToString(GSON.toJson(claims).getBytes(StandardCharsets.UTF_8));
        Signature signer = Signature.getInstance("SHA256withRSA");
        signer.initSign(key);
        signer.update(signingInput.getBytes(StandardCharsets.US_ASCII));
        String token = signingInput + "." + B64URL.encodeToString(signer.sign());
        Secrets.add(token);
        return token;
    }

    /** Inji's WLA token: RS256, x5t#S256, {iss, sub, aud: esignet-binding, iat, exp = iat + 18000}, no jti. */
    static String injiToken(String individualId, String thumbprint, PrivateKey key) throws GeneralSecurityException {
        Map<String, Object> header = new LinkedHashMap<>();
        header.put("alg", "RS256");
        header.put("x5t#S256", thumbprint);
        long iat = Instant.now().getEpochSecond();
        Map<String, Object> claims = new LinkedHashMap<>();
        claims.put("iss", "inji-wallet");
        claims.put("sub", individualId);
        claims.put("aud", "esignet-binding");
        claims.put("iat", iat);
        claims.put("exp", iat + 18000);
        return rs256(header, claims, key);
    }

    /** A token every profile accepts (short-lived, with a jti), for the checks that are not about the profile. */
    static String shortToken(String individualId, String thumbprint, PrivateKey key) throws GeneralSecurityException {
        Map<String, Object> header = new LinkedHashMap<>();
        header.put("alg", "RS256");
        if (thumbprint != null) {
            header.put("x5t#S256", thumbprint);
        }
        long iat = Instant.now().getEpochSecond();
        Map<String, Object> claims = new LinkedHashMap<>();
        claims.put("iss", "inji-wallet");
        claims.put("sub", individualId);
        claims.put("aud", "esignet-binding");
        claims.put("iat", iat);
        claims.put("exp", iat + 120);
        claims.put("jti", B64URL.encodeToString(java.security.SecureRandom.getSeed(12)));
        return rs256(header, claims, key);
    }

    /** The secrets the tests handled: none may appear in any log record (LogHygieneTest, and the driver). */
    static final class Secrets {
        private static final List<String> VALUES = new ArrayList<>();

        static synchronized void add(String value) {
            if (value != null && !value.isBlank()) {
                VALUES.add(value);
            }
        }

        static synchronized List<String> all() {
            return new ArrayList<>(VALUES);
        }
    }

    private TestSupport() {}
}
