package io.keybinder.esignet;

import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.junit.jupiter.api.Order;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/**
 * Runs last (ClassOrderer.OrderAnnotation, set by the driver): nothing secret that the other tests handled
 * — OTPs, the partner API key, wallet tokens, individual IDs — is in any log record they produced.
 */
@ExtendWith(LogCapture.class)
@Order(Integer.MAX_VALUE)
class LogHygieneTest {

    @Test
    void noSecretReachedTheLog() {
        String log = LogCapture.text();
        assertTrue(LogCapture.lines().size() >= 10, "the other tests logged (is the plugin's logger captured?)");
        assertTrue(TestSupport.Secrets.all().size() >= 10, "the other tests registered what they handled");
        for (String secret : TestSupport.Secrets.all()) {
            // Not the value in the message: a failure must not print the secret either.
            assertFalse(log.contains(secret), "a secret of " + secret.length() + " characters is in the log");
        }
        assertFalse(log.contains(TestSupport.partnerApiKey()), "the partner API key is in the log");
        assertFalse(log.contains("Bearer not-for-keybinder"), "a request header value is in the log");
    }
}
