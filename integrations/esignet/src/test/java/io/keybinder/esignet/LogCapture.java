package io.keybinder.esignet;

import java.io.IOException;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.List;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import java.util.logging.Logger;
import org.junit.jupiter.api.extension.BeforeAllCallback;
import org.junit.jupiter.api.extension.ExtensionContext;

/**
 * Everything logged while the tests run: the plugin logs through SLF4J, which slf4j-jdk14 hands to
 * java.util.logging here (eSignet's logback in production). The plugin's loggers at every level, the
 * rest (grpc, netty) at INFO and above; each record with its exception chain, also appended to
 * $KEYBINDER_TEST_LOG_FILE for the driver to search.
 */
final class LogCapture extends Handler implements BeforeAllCallback {

    private static final List<String> LINES = new ArrayList<>();
    // JUL holds loggers weakly: keep the configured one alive.
    private static final Logger PLUGIN = Logger.getLogger("io.keybinder");
    private static boolean installed;

    @Override
    public void beforeAll(ExtensionContext context) {
        install();
    }

    static synchronized void install() {
        if (installed) {
            return;
        }
        installed = true;
        PLUGIN.setLevel(Level.ALL);
        LogCapture handler = new LogCapture();
        handler.setLevel(Level.ALL);
        Logger.getLogger("").addHandler(handler);
        PLUGIN.addHandler(handler);
        PLUGIN.setUseParentHandlers(false);  // captured once; printed by the driver only on failure
    }

    @Override
    public void publish(LogRecord record) {
        StringBuilder line = new StringBuilder()
                .append(record.getLevel()).append(' ').append(record.getLoggerName()).append(": ")
                .append(record.getMessage());
        if (record.getParameters() != null) {
            for (Object parameter : record.getParameters()) {
                line.append(" | ").append(parameter);
            }
        }
        if (record.getThrown() != null) {
            StringWriter trace = new StringWriter();
            record.getThrown().printStackTrace(new PrintWriter(trace));
            line.append('\n').append(trace);
        }
        String text = line.toString();
        synchronized (LogCapture.class) {
            LINES.add(text);
        }
        String file = System.getenv("KEYBINDER_TEST_LOG_FILE");
        if (file != null) {
            try {
                Files.writeString(Path.of(file), text + "\n", StandardCharsets.UTF_8, StandardOpenOption.CREATE,
                        StandardOpenOption.APPEND);
            } catch (IOException err) {
                throw new IllegalStateException("cannot append to KEYBINDER_TEST_LOG_FILE", err);
            }
        }
    }

    static synchronized List<String> lines() {
        return new ArrayList<>(LINES);
    }

    static synchronized String text() {
        return String.join("\n", LINES);
    }

    @Override
    public void flush() {}

    @Override
    public void close() {}
}
