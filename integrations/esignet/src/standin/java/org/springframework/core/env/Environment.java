// Compile-only stand-in for Spring's Environment (spring-core); the real interface has more methods,
// none of which the plugin calls. Never packaged.
package org.springframework.core.env;

public interface Environment extends PropertyResolver {}
