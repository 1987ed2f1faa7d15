// Compile-only stand-in for Spring's PropertyResolver (spring-core): only the methods the plugin calls,
// with their real signatures. Never packaged.
package org.springframework.core.env;

public interface PropertyResolver {
    String getProperty(String key);

    String getProperty(String key, String defaultValue);
}
