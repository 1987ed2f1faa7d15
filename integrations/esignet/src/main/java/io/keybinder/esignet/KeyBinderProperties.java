package io.keybinder.esignet;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.Set;
import java.util.function.Function;
import java.util.stream.Collectors;

/**
 * The plugin's settings ({@code keybinder.grpc.*}), read once from eSignet's Spring environment.
 *
 * <p>Every problem is an {@link IllegalStateException} whose one-line message names the property and
 * what to do; secrets are read from a source ({@code file:/path} or {@code env:NAME}) and never echoed.
 */
public final class KeyBinderProperties {

    public static final String PREFIX = "keybinder.grpc.";
    /** eSignet's own WLA audience property (application-default.properties: esignet-binding). */
    public static final String ESIGNET_AUDIENCE = "mosip.esignet.binding.audience-id";
    public static final String DEFAULT_AUDIENCE = "esignet-binding";

    public final String target;
    public final boolean plaintext;
    public final Path caFile;
    public final Path clientCertFile;
    public final Path clientKeyFile;
    public final String partnerId;
    /** Never logged, never part of toString(). */
    final String partnerApiKey;
    public final Duration deadline;
    public final Duration formatsCacheTime;
    public final Set<String> allowedKeyTypes;
    public final String wlaAudience;

    private KeyBinderProperties(Function<String, String> source) {
        target = required(source, "target");
        plaintext = bool(source, "plaintext", false);
        caFile = file(source, "ca-file");
        clientCertFile = file(source, "client-cert-file");
        clientKeyFile = file(source, "client-key-file");
        if ((clientCertFile == null) != (clientKeyFile == null)) {
            throw new IllegalStateException(PREFIX + "client-cert-file and " + PREFIX
                    + "client-key-file go together (mTLS): set both or neither");
        }
        if (plaintext && (caFile != null || clientCertFile != null)) {
            throw new IllegalStateException(PREFIX + "plaintext=true cannot be combined with a CA or client certificate");
        }
        partnerId = optional(source, "partner-id");
        partnerApiKey = secret(optional(source, "partner-api-key-source"));
        deadline = Duration.ofMillis(positiveLong(source, "deadline-ms", 5000));
        formatsCacheTime = Duration.ofSeconds(nonNegativeLong(source, "formats-cache-seconds", 300));
        allowedKeyTypes = keyTypes(optional(source, "allowed-key-types"));
        String audience = optional(source, "wla-audience");
        if (audience == null) {
            audience = source.apply(ESIGNET_AUDIENCE);
        }
        wlaAudience = audience == null || audience.isBlank() ? DEFAULT_AUDIENCE : audience.trim();
    }

    /** Reads the settings through {@code lookup} (e.g. {@code environment::getProperty}). */
    public static KeyBinderProperties from(Function<String, String> lookup) {
        return new KeyBinderProperties(lookup);
    }

    /** Both components call as the configured partner when eSignet gives no headers: fail at start without one. */
    void requirePartnerCredential(String why) {
        if (partnerId == null || partnerApiKey == null) {
            throw new IllegalStateException(PREFIX + "partner-id and " + PREFIX + "partner-api-key-source are needed: "
                    + why);
        }
    }

    private static String optional(Function<String, String> source, String name) {
        String value = source.apply(PREFIX + name);
        return value == null || value.isBlank() ? null : value.trim();
    }

    private static String required(Function<String, String> source, String name) {
        String value = optional(source, name);
        if (value == null) {
            throw new IllegalStateException(PREFIX + name + " is not set: give the KeyBinder server as host:port");
        }
        return value;
    }

    private static boolean bool(Function<String, String> source, String name, boolean fallback) {
        String value = optional(source, name);
        if (value == null) {
            return fallback;
        }
        if (value.equalsIgnoreCase("true") || value.equalsIgnoreCase("false")) {
            return Boolean.parseBoolean(value);
        }
        throw new IllegalStateException(PREFIX + name + " must be true or false");
    }

    private static long nonNegativeLong(Function<String, String> source, String name, long fallback) {
        String value = optional(source, name);
        if (value == null) {
            return fallback;
        }
        try {
            long parsed = Long.parseLong(value);
            if (parsed >= 0) {
                return parsed;
            }
        } catch (NumberFormatException err) {
            // reported below
        }
        throw new IllegalStateException(PREFIX + name + " must be a whole number >= 0, not '" + value + "'");
    }

    private static long positiveLong(Function<String, String> source, String name, long fallback) {
        long value = nonNegativeLong(source, name, fallback);
        if (value == 0) {
            throw new IllegalStateException(PREFIX + name + " must be > 0: every call has a deadline");
        }
        return value;
    }

    private static Path file(Function<String, String> source, String name) {
        String value = optional(source, name);
        if (value == null) {
            return null;
        }
        Path path = Path.of(value);
        if (!Files.isReadable(path)) {
            throw new IllegalStateException(PREFIX + name + " names a file that cannot be read: " + path);
        }
        return path;
    }

    /** file:/path or env:NAME; the value itself is never accepted (it would sit in a config file or argv). */
    private static String secret(String sourceSpec) {
        if (sourceSpec == null) {
            return null;
        }
        String property = PREFIX + "partner-api-key-source";
        String value;
        if (sourceSpec.startsWith("file:")) {
            Path path = Path.of(sourceSpec.substring("file:".length()));
            try {
                value = Files.readString(path, StandardCharsets.UTF_8).trim();
            } catch (IOException err) {
                throw new IllegalStateException(property + ": cannot read " + path + " (" + err.getClass().getSimpleName()
                        + "): check the file and its permissions");
            }
        } else if (sourceSpec.startsWith("env:")) {
            String name = sourceSpec.substring("env:".length());
            value = System.getenv(name);
            if (value == null) {
                throw new IllegalStateException(property + ": environment variable " + name + " is not set");
            }
            value = value.trim();
        } else {
            // Not echoed: a value without the prefix may be the key itself, pasted by mistake.
            throw new IllegalStateException(property + " is file:/path or env:NAME, never the key itself");
        }
        if (value.isEmpty()) {
            throw new IllegalStateException(property + " names an empty secret");
        }
        return value;
    }

    private static Set<String> keyTypes(String value) {
        if (value == null) {
            return Collections.singleton(WalletKeyType.RSA.label);
        }
        Set<String> types = new LinkedHashSet<>();
        for (String item : value.split(",")) {
            String label = item.trim();
            if (label.isEmpty()) {
                continue;
            }
            if (WalletKeyType.byLabel(label) == null) {
                throw new IllegalStateException(PREFIX + "allowed-key-types: unknown key type '" + label + "' (known: "
                        + Arrays.stream(WalletKeyType.values()).map(t -> t.label).collect(Collectors.joining(", ")) + ")");
            }
            types.add(WalletKeyType.byLabel(label).label);
        }
        if (types.isEmpty()) {
            throw new IllegalStateException(PREFIX + "allowed-key-types is empty: name at least one key type");
        }
        return Collections.unmodifiableSet(types);
    }

    @Override
    public String toString() {
        return "KeyBinderProperties{target=" + target + ", plaintext=" + plaintext + ", mtls=" + (clientCertFile != null)
                + ", partnerId=" + partnerId + ", deadline=" + deadline + ", allowedKeyTypes=" + allowedKeyTypes + "}";
    }
}
