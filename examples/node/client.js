#!/usr/bin/env node
// KeyBinder partner client in Node.js: the whole flow a wallet backend runs.
//
//   1. SendBindingOtp for an individual (channel email)
//   2. read the OTP from the development outbox (a person would read it from their mail)
//   3. DoKeyBinding with a fresh EC P-256 wallet key and an OTP challenge (+ proof of possession)
//   4. sign a Wallet Local Authentication (WLA) token with the wallet key
//   5. VerifyWalletToken, then show that replaying the same token is refused (token_replayed)
//
// Configuration (environment):
//   KEYBINDER_TARGET                 host:port of the server          (default 127.0.0.1:50051)
//   KEYBINDER_PARTNER_ID             partner-id metadata              (default demo-wallet)
//   KEYBINDER_DATA_DIR               the server's data directory      (default .keybinder)
//   KEYBINDER_PARTNER_API_KEY_FILE   file holding the partner API key, sent as partner-api-key
//                                    (default <data dir>/demo-partner.key, written by `make setup`)
//   KEYBINDER_INDIVIDUAL_ID          the individual to bind           (default 1234567890)
//   KEYBINDER_OUTBOX                 the server's outbox file         (default <data dir>/outbox.jsonl)
//   KEYBINDER_AUDIENCE               aud of WLA tokens and proofs     (default keybinder)
// With --json the last line printed is a JSON summary. Exit status 0 only if every step worked.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const env = process.env;
const dataDir = env.KEYBINDER_DATA_DIR || ".keybinder";
const config = {
  target: env.KEYBINDER_TARGET || "127.0.0.1:50051",
  partnerId: env.KEYBINDER_PARTNER_ID || "demo-wallet",
  apiKeyFile: env.KEYBINDER_PARTNER_API_KEY_FILE || path.join(dataDir, "demo-partner.key"),
  individualId: env.KEYBINDER_INDIVIDUAL_ID || "1234567890",
  outbox: env.KEYBINDER_OUTBOX || path.join(dataDir, "outbox.jsonl"),
  audience: env.KEYBINDER_AUDIENCE || "keybinder",
  json: process.argv.includes("--json"),
};

function loadService() {
  const definition = protoLoader.loadSync("keybinder/v1/keybinder.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the proto (snake_case)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).keybinder.v1.KeyBinderService;
}

let cachedKey;
function apiKey() {
  if (cachedKey === undefined) {
    try {
      cachedKey = fs.readFileSync(config.apiKeyFile, "utf8").trim();
    } catch (err) {
      throw new Error(`cannot read the partner API key from ${config.apiKeyFile}: ${err.code || err.message}`);
    }
  }
  return cachedKey;
}

function partnerMetadata() {
  const md = new grpc.Metadata();
  md.set("partner-id", config.partnerId);
  // A secret: read from a file, never from argv, never printed.
  md.set("partner-api-key", apiKey());
  return md;
}

// Promise wrapper around a unary call, with a deadline.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 15000);
    client[method](request, partnerMetadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// --- error details: google.rpc.Status -> google.protobuf.Any -> google.rpc.ErrorInfo ----------
// The reason code (e.g. "auth_failed") travels in the grpc-status-details-bin trailer. Decoding it
// needs only three tiny messages, so a minimal protobuf reader does it without extra packages.

function* protoFields(buf) {
  let pos = 0;
  const varint = () => {
    let result = 0n;
    for (let shift = 0n; ; shift += 7n) {
      const byte = buf[pos++];
      if (byte === undefined) throw new Error("truncated protobuf");
      result |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return result;
    }
  };
  while (pos < buf.length) {
    const key = Number(varint());
    const field = key >> 3;
    const wire = key & 7;
    if (wire === 0) yield [field, varint()];
    else if (wire === 2) {
      const len = Number(varint());
      yield [field, buf.subarray(pos, pos + len)];
      pos += len;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

function errorReason(err) {
  const [details] = (err.metadata && err.metadata.get("grpc-status-details-bin")) || [];
  if (!details) return "";
  for (const [field, any] of protoFields(details)) {
    if (field !== 3) continue; // Status.details
    let typeUrl = "";
    let value = Buffer.alloc(0);
    for (const [f, v] of protoFields(any)) {
      if (f === 1) typeUrl = v.toString();
      if (f === 2) value = v;
    }
    if (typeUrl.endsWith("/google.rpc.ErrorInfo")) {
      for (const [f, v] of protoFields(value)) if (f === 1) return v.toString(); // ErrorInfo.reason
    }
  }
  return "";
}

// --- JOSE: compact JWS with ES256 ---------------------------------------------------------------

const b64url = (data) => Buffer.from(data).toString("base64url");

function signEs256(privateKey, header, payload) {
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  // JWS wants r||s (IEEE P1363), not DER.
  const signature = crypto.sign("sha256", Buffer.from(input), { key: privateKey, dsaEncoding: "ieee-p1363" });
  return `${input}.${b64url(signature)}`;
}

async function readOtp(outbox, transactionId, timeoutMs = 5000) {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (fs.existsSync(outbox)) {
      const lines = fs.readFileSync(outbox, "utf8").trim().split("\n").reverse();
      for (const line of lines) {
        if (!line) continue;
        const message = JSON.parse(line);
        if (message.transaction_id === transactionId) return message.otp;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no OTP for transaction ${transactionId} in ${outbox}`);
}

async function main() {
  const KeyBinderService = loadService();
  const client = new KeyBinderService(config.target, grpc.credentials.createInsecure());
  try {
    const formats = await call(client, "GetSupportedChallengeFormats", { auth_factor_type: "OTP" });
    console.log(`1. OTP challenge formats: ${formats.formats.join(", ")}`);

    const sent = await call(client, "SendBindingOtp", {
      individual_id: config.individualId,
      otp_channels: ["email"],
    });
    console.log(`2. OTP sent to ${sent.masked_email} (transaction ${sent.transaction_id})`);
    const otp = await readOtp(config.outbox, sent.transaction_id);
    console.log(`3. read the OTP from ${config.outbox}`);

    const { privateKey, publicKey } = crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
    const jwk = publicKey.export({ format: "jwk" }); // {kty: "EC", crv: "P-256", x, y}: public members only
    const proof = signEs256(privateKey, { alg: "ES256" }, { nonce: sent.transaction_id, aud: config.audience });
    const bound = await call(client, "DoKeyBinding", {
      individual_id: config.individualId,
      challenges: [{ auth_factor_type: "OTP", format: "alpha-numeric", challenge: otp }],
      public_key_jwk: JSON.stringify(jwk),
      bind_auth_factor_type: "WLA",
      proof_of_possession: proof,
    });
    const cert = new crypto.X509Certificate(bound.certificate);
    const thumbprint = crypto.createHash("sha256").update(cert.raw).digest("base64url");
    if (thumbprint !== bound.thumbprint) throw new Error("the returned thumbprint is not x5t#S256 of the certificate");
    if (!cert.publicKey.equals(publicKey)) throw new Error("the certificate is not for our wallet key");
    console.log("4. bound the wallet key:");
    console.log(`   subject     ${cert.subject}`);
    console.log(`   issuer      ${cert.issuer.replace(/\n/g, ", ")}`);
    console.log(`   valid until ${cert.validTo}`);
    console.log(`   x5t#S256    ${bound.thumbprint}`);

    const now = Math.floor(Date.now() / 1000);
    const token = signEs256(
      privateKey,
      { alg: "ES256", typ: "JWT", "x5t#S256": bound.thumbprint },
      { sub: config.individualId, aud: config.audience, iat: now, exp: now + 60, jti: crypto.randomUUID() },
    );
    const request = { token, individual_id: config.individualId };
    const verified = await call(client, "VerifyWalletToken", request);
    if (!verified.valid || verified.thumbprint !== bound.thumbprint) throw new Error("the WLA token did not verify");
    if (verified.partner_specific_user_token !== bound.partner_specific_user_token) throw new Error("PSUT mismatch");
    console.log(`5. WLA token verified (jti ${verified.jti})`);

    let replay = "";
    try {
      await call(client, "VerifyWalletToken", request);
    } catch (err) {
      replay = errorReason(err);
    }
    if (replay !== "token_replayed") throw new Error(`a replayed token must be refused, got ${replay || "success"}`);
    console.log(`6. the same token again is refused: ${replay}`);

    if (config.json) {
      console.log(
        JSON.stringify({
          subject: cert.subject,
          thumbprint: bound.thumbprint,
          partner_specific_user_token: bound.partner_specific_user_token,
          jti: verified.jti,
        }),
      );
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const reason = errorReason(err);
  const status = err.code !== undefined ? `${grpc.status[err.code]} ` : "";
  const hint = err.code === grpc.status.UNAVAILABLE && !reason ? ` (no server at ${config.target}? start one with \`make run\`)` : "";
  console.error(`failed: ${status}${reason ? `[${reason}] ` : ""}${err.details || err.message}${hint}`);
  process.exitCode = 1;
});
