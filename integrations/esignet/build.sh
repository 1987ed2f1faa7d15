#!/usr/bin/env bash
# Builds the eSignet plugin with javac 17 against Debian bookworm's Java packages (`make esignet-plugin`;
# Maven Central is out of reach here — pom.xml is the production build). Output under build/:
#   keybinder-esignet-plugin.jar   the plugin (io.keybinder.esignet + the keybinder.v1 stubs)
#   lib/                           what it needs at runtime besides eSignet (grpc, netty, protobuf, ...)
#   jni/                           Debian's netty-tcnative JNI library, under the name Netty loads
#   test-classes/, test-lib/       the JUnit tests and what they need on top (stand-ins, slf4j, junit)
# Usage: build.sh PYTHON_SITE_PACKAGES (where googleapis-common-protos keeps google/rpc/*.proto)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
site=${1:?usage: build.sh PYTHON_SITE_PACKAGES}
out=$here/build
J=/usr/share/java

# Runtime jars, as Debian names them (the versioned files, so lib/ says what it holds).
runtime=(
  "$J"/grpc-api-1.41.3.jar "$J"/grpc-context-1.41.3.jar "$J"/grpc-core-1.41.3.jar "$J"/grpc-stub-1.41.3.jar
  "$J"/grpc-protobuf-1.41.3.jar "$J"/grpc-protobuf-lite-1.41.3.jar "$J"/grpc-netty-1.41.3.jar
  "$J"/protobuf-3.21.12.jar "$J"/guava-31.1-jre.jar "$J"/perfmark-api-0.21.0.jar "$J"/gson-2.10.jar
  "$J"/netty-buffer-4.1.48.Final.jar "$J"/netty-codec-4.1.48.Final.jar "$J"/netty-codec-http-4.1.48.Final.jar
  "$J"/netty-codec-http2-4.1.48.Final.jar "$J"/netty-codec-socks-4.1.48.Final.jar
  "$J"/netty-common-4.1.48.Final.jar "$J"/netty-handler-4.1.48.Final.jar "$J"/netty-handler-proxy-4.1.48.Final.jar
  "$J"/netty-resolver-4.1.48.Final.jar "$J"/netty-transport-4.1.48.Final.jar
  "$J"/netty-tcnative-2.0.28.Final.jar
)
# eSignet has SLF4J (Spring Boot's logging); the tests route it to java.util.logging to capture it.
provided=("$J"/slf4j-api-1.7.32.jar)
# javax.annotation.Generated in the stubs; errorprone annotations on grpc classes (for -Werror)
compile_only=("$J"/geronimo-annotation-1.3-spec-1.3.jar "$J"/error-prone-annotations-2.18.0.jar)
jni=$(dpkg -L libnetty-tcnative-jni 2>/dev/null | grep '/libnetty-tcnative\.so$' | head -n1 || true)
jni=${jni:-/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so}
tests=("$J"/slf4j-jdk14-1.7.32.jar "$J"/junit-platform-console-standalone-1.9.1.jar)

for jar in "${runtime[@]}" "${provided[@]}" "${compile_only[@]}" "${tests[@]}" "$jni"; do
  [[ -f $jar ]] || { echo "missing $jar: run 'make esignet-plugin' (it installs the Debian packages)" >&2; exit 1; }
done
[[ -f $site/google/rpc/error_details.proto ]] || { echo "no google/rpc/error_details.proto under $site" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"/{gen,classes/standin,classes/rpc,classes/main,test-classes,lib,test-lib}
cp_of() { local IFS=:; echo "$*"; }

# Stubs: keybinder.v1 from the contract; google.rpc.Status/ErrorInfo (proto-google-common-protos in a
# Maven build) from the Python package's copies of googleapis' protos.
protoc -I "$root/protos" -I "$site" \
  --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  --java_out="$out/gen" --grpc-java_out="$out/gen" \
  "$root/protos/keybinder/v1/keybinder.proto" google/rpc/status.proto google/rpc/error_details.proto

JAVAC=(javac --release 17 -encoding UTF-8 -Xlint:all,-processing,-serial -Werror)
"${JAVAC[@]}" -d "$out/classes/standin" $(find "$here/src/standin/java" -name '*.java')
javac --release 17 -encoding UTF-8 -nowarn -d "$out/classes/rpc" -cp "$(cp_of "${runtime[@]}")" \
  $(find "$out/gen/com" -name '*.java')
javac --release 17 -encoding UTF-8 -nowarn -d "$out/classes/main" \
  -cp "$(cp_of "$out/classes/standin" "$out/classes/rpc" "${runtime[@]}" "${provided[@]}" "${compile_only[@]}")" \
  $(find "$out/gen/keybinder" -name '*.java')
"${JAVAC[@]}" -d "$out/classes/main" \
  -cp "$(cp_of "$out/classes/main" "$out/classes/standin" "$out/classes/rpc" "${runtime[@]}" "${provided[@]}" "${compile_only[@]}")" \
  $(find "$here/src/main/java" -name '*.java')

jar --create --file "$out/keybinder-esignet-plugin.jar" -C "$out/classes/main" .
jar --create --file "$out/lib/keybinder-google-rpc-protos.jar" -C "$out/classes/rpc" .
cp -L "${runtime[@]}" "$out/lib/"
# Debian's Netty has JDK ALPN patched out, so TLS (HTTP/2 needs ALPN) goes through OpenSSL with
# netty-tcnative; Netty loads it as libnetty_tcnative.so and checks the file's own name (a copy, not a link).
mkdir -p "$out/jni"
cp -L "$jni" "$out/jni/libnetty_tcnative.so"
cp -L "${provided[@]}" "${tests[@]}" "$out/test-lib/"
cp -r "$out/classes/standin" "$out/test-lib/standin-classes"

"${JAVAC[@]}" -d "$out/test-classes" \
  -cp "$(cp_of "$out/keybinder-esignet-plugin.jar" "$out/lib"/*.jar "$out/test-lib"/*.jar "$out/test-lib/standin-classes" "${compile_only[@]}")" \
  $(find "$here/src/test/java" -name '*.java')

echo "built $out/keybinder-esignet-plugin.jar ($(stat -c %s "$out/keybinder-esignet-plugin.jar") bytes)" \
  "+ lib/ ($(ls "$out/lib" | wc -l) jars, $(du -sh "$out/lib" | cut -f1))"
