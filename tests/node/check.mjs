// A Node.js client of proto/flexcache/v1/cache.proto, built from the proto alone (no generated code):
// shows that a client in another language can Put, Lookup, Fetch, Stats and Delete against a real
// daemon, over plain text or TLS (mTLS), with or without a bearer token. tests/test_node_client.py
// runs it; by hand:
//
//   npm ci --prefix tests/node
//   FLEXCACHE_TARGET=127.0.0.1:50051 node tests/node/check.mjs
//
// Environment:
//   FLEXCACHE_TARGET     host:port of the daemon (required)
//   FLEXCACHE_CA_FILE    PEM CA bundle: connect with TLS, verifying the daemon against it; unset: plain text
//   FLEXCACHE_CERT_FILE  with FLEXCACHE_KEY_FILE: a client certificate chain and its key (mTLS)
//   FLEXCACHE_KEY_FILE
//   FLEXCACHE_TLS_SERVER_NAME  the name to verify the daemon's certificate for, if not the target's host
//   FLEXCACHE_TOKEN      sent as `authorization: Bearer <token>` on every call
//   FLEXCACHE_TENANT     the namespace's tenant (default "acme"); FLEXCACHE_MODEL its model (default "node-check")
//   FLEXCACHE_EXPECT     UNAUTHENTICATED or PERMISSION_DENIED: only do a Lookup, and succeed only if it
//                        fails with that status
//   FLEXCACHE_PROTO      the proto file (default: proto/flexcache/v1/cache.proto of this repository)
//   FLEXCACHE_READ_TARGET  another member of the same cluster: the Lookups and the Fetch go there (Put,
//                        Stats and Delete to FLEXCACHE_TARGET). Stats are per node, so the put's namespace
//                        is then only reported, not required, in them.
//
// Success: one JSON line on stdout, exit 0. Failure: one line on stderr, exit 1 (2: bad environment).

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHUNK = 1 << 20; // Put chunks of at most 1 MiB, as the proto asks
const BLOB_BYTES = 2 * CHUNK + 12345; // three chunks, the last one short
const DIM = 16;
const DEADLINE_MS = 30_000;

class CheckFailed extends Error {}

function fail(reason) {
  throw new CheckFailed(reason);
}

// ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven ----
const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32c(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC32C_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const sha256 = (bytes) => createHash("sha256").update(bytes).digest();

// ---- connection ----
function env(name, fallback = "") {
  const value = process.env[name];
  return value === undefined || value === "" ? fallback : value;
}

function credentials() {
  const caFile = env("FLEXCACHE_CA_FILE");
  if (!caFile) return { creds: grpc.credentials.createInsecure(), tls: false, mtls: false };
  const certFile = env("FLEXCACHE_CERT_FILE");
  const keyFile = env("FLEXCACHE_KEY_FILE");
  if (Boolean(certFile) !== Boolean(keyFile)) {
    throw new CheckFailed("FLEXCACHE_CERT_FILE and FLEXCACHE_KEY_FILE go together: set both (mTLS) or neither");
  }
  const ca = readFileSync(caFile);
  const creds = certFile
    ? grpc.credentials.createSsl(ca, readFileSync(keyFile), readFileSync(certFile))
    : grpc.credentials.createSsl(ca);
  return { creds, tls: true, mtls: Boolean(certFile) };
}

function loadService() {
  const protoFile = env("FLEXCACHE_PROTO", path.resolve(HERE, "../../proto/flexcache/v1/cache.proto"));
  const definition = protoLoader.loadSync(protoFile, {
    keepCase: true, // field names as the proto spells them: entry_id, total_steps
    longs: String, // uint64 sizes come back as decimal strings, never rounded
    enums: String, // roles by name: "ROLE_FULL"
    bytes: Buffer,
    defaults: true,
    oneofs: true, // msg: "header" | "chunk"
  });
  return grpc.loadPackageDefinition(definition).flexcache.v1.CacheService;
}

function metadata() {
  const md = new grpc.Metadata();
  const token = env("FLEXCACHE_TOKEN");
  if (token) md.set("authorization", `Bearer ${token}`);
  return md;
}

const options = () => ({ deadline: new Date(Date.now() + DEADLINE_MS) });

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

function rpcFailure(method, err) {
  const e = new CheckFailed(`${method} failed: ${statusName(err.code)}: ${err.details || err.message}`);
  e.code = err.code;
  return e;
}

// ---- the calls, as promises ----
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), options(), (err, answer) =>
      err ? reject(rpcFailure(method, err)) : resolve(answer));
  });
}

function put(client, header, data) {
  return new Promise((resolve, reject) => {
    const call = client.Put(metadata(), options(), (err, answer) =>
      err ? reject(rpcFailure("Put", err)) : resolve(answer));
    call.write({ header });
    for (let at = 0; at < data.length; at += CHUNK) call.write({ chunk: data.subarray(at, at + CHUNK) });
    call.end();
  });
}

function fetch(client, request) {
  return new Promise((resolve, reject) => {
    const call = client.Fetch(request, metadata(), options());
    let header = null;
    const chunks = [];
    let failure = null;
    call.on("data", (message) => {
      if (message.msg === "header") {
        if (header !== null || chunks.length) failure ??= "Fetch sent a second header, or a header after chunks";
        header = message.header;
      } else if (message.msg === "chunk") {
        if (header === null) failure ??= "Fetch sent a chunk before its header";
        chunks.push(message.chunk);
      } else {
        failure ??= `Fetch sent a message with neither header nor chunk (${message.msg})`;
      }
    });
    call.on("error", (err) => reject(rpcFailure("Fetch", err)));
    call.on("end", () => {
      if (failure) reject(new CheckFailed(failure));
      else if (header === null) reject(new CheckFailed("Fetch ended without a header"));
      else resolve({ header, data: Buffer.concat(chunks), chunks: chunks.length });
    });
  });
}

// ---- the check ----
function namespace() {
  return {
    tenant: env("FLEXCACHE_TENANT", "acme"),
    model: env("FLEXCACHE_MODEL", "node-check"),
    width: 64,
    height: 64,
    frames: 8,
    scheduler: "flow",
    total_steps: 50,
  };
}

function namespaceName(ns) {
  return [ns.tenant, ns.model, `${ns.width}x${ns.height}x${ns.frames}`, ns.scheduler, ns.total_steps].join("/");
}

function vector() {
  // Deterministic, not all zeros: exactly representable in float32, so the lookup sends what the put did.
  return Array.from({ length: DIM }, (_, i) => ((i % 5) - 2 + 0.5 * (i % 3)) / 4);
}

async function expectFailure(client, ns, expected, seen) {
  if (!(expected in grpc.status)) fail(`FLEXCACHE_EXPECT=${expected} is not a gRPC status name`);
  try {
    await unary(client, "Lookup", { namespace: ns, vectors: { full: vector() }, top_k: 1 });
  } catch (err) {
    if (!(err instanceof CheckFailed) || err.code === undefined) throw err;
    if (err.code !== grpc.status[expected]) fail(`expected ${expected}, got ${err.message}`);
    return { ...seen, expected, lookup: statusName(err.code), details: err.message };
  }
  return fail(`expected ${expected}, but Lookup succeeded`);
}

async function fullCheck(client, reader, ns, seen) {
  const data = randomBytes(BLOB_BYTES);
  const digest = sha256(data);
  const crc = crc32c(data);
  const full = vector();
  const blob = { size: data.length, sha256: digest, crc32c: crc, codec: "raw", dtype: "uint8", shape: [data.length],
                 step: 0, attrs: { writer_lang: "node" } };
  const header = { namespace: ns, prompt: `a node.js client checks the cache ${digest.toString("hex").slice(0, 8)}`,
                   vectors: { full }, blob, step_seconds: 0.5 };

  const stored = await put(client, header, data);
  const entryId = stored.entry_id;
  if (!/^[0-9a-f]{64}$/.test(entryId)) fail(`Put returned entry_id ${JSON.stringify(entryId)}, not 64 hex characters`);
  if (!stored.created) fail("Put of a new blob answered created=false");
  seen.put = { entry_id: entryId, created: stored.created, stored_bytes: stored.stored_bytes,
               chunks: Math.ceil(data.length / CHUNK) };

  const found = await unary(reader, "Lookup", { namespace: ns, vectors: { full }, top_k: 3 });
  const candidate = found.candidates.find((c) => c.entry_id === entryId);
  if (!candidate) {
    fail(`Lookup with the put's own vector did not return its entry (${found.candidates.length} candidates, ` +
         `miss_reason ${JSON.stringify(found.miss_reason)})`);
  }
  if (candidate.role !== "ROLE_FULL") fail(`Lookup returned the entry as ${candidate.role}, not ROLE_FULL`);
  if (candidate.similarity < 0.999) fail(`Lookup similarity ${candidate.similarity} for the same vector`);
  if (!Buffer.from(candidate.blob.sha256).equals(digest)) fail("Lookup candidate's blob.sha256 is not the put's");
  seen.lookup = { candidates: found.candidates.length, similarity: candidate.similarity,
                  granted_steps: candidate.granted_steps, role: candidate.role, writer: candidate.writer ?? "" };

  const fetched = await fetch(reader, { namespace: ns, entry_id: entryId, role: "ROLE_FULL",
                                        granted_steps: candidate.granted_steps });
  const got = fetched.header.blob;
  if (fetched.header.entry_id !== entryId) fail(`Fetch header names entry ${fetched.header.entry_id}`);
  if (String(got.size) !== String(data.length)) fail(`Fetch header says ${got.size} bytes, the put sent ${data.length}`);
  if (!Buffer.from(got.sha256).equals(digest)) fail("Fetch header's blob.sha256 is not the put's");
  if (got.crc32c !== undefined && got.crc32c !== null && got.crc32c >>> 0 !== crc) {
    fail(`Fetch header's crc32c ${got.crc32c} is not the put's ${crc}`);
  }
  if (fetched.data.length !== data.length) fail(`Fetch streamed ${fetched.data.length} bytes, the put sent ${data.length}`);
  const fetchedDigest = sha256(fetched.data);
  if (!fetchedDigest.equals(digest)) fail("Fetch streamed bytes whose sha256 is not the put's");
  if (!fetched.data.equals(data)) fail("Fetch streamed other bytes than the put sent");
  if (crc32c(fetched.data) !== crc) fail("Fetch streamed bytes whose crc32c is not the put's");
  seen.fetch = { bytes: fetched.data.length, chunks: fetched.chunks, sha256: fetchedDigest.toString("hex"),
                 crc32c: crc, codec: got.codec, dtype: got.dtype, shape: got.shape.map(String) };

  const stats = await unary(client, "Stats", {});
  const name = namespaceName(ns);
  const mine = stats.namespaces.find((n) => n.name === name);
  if (!mine && reader === client) fail(`Stats lists no namespace ${name} (it lists ${stats.namespaces.length})`);
  if (mine && Number(mine.entries) < 1) fail(`Stats says namespace ${name} holds ${mine.entries} entries`);
  seen.stats = { entries: stats.entries, bytes: stats.bytes, namespaces: stats.namespaces.length,
                 namespace_entries: mine ? mine.entries : "0", eviction_policy: stats.eviction_policy };

  const deleted = await unary(client, "Delete", { namespace: ns, entry_id: entryId });
  if (!deleted.deleted) fail("Delete of the entry just put answered deleted=false");
  const after = await unary(reader, "Lookup", { namespace: ns, vectors: { full }, top_k: 3 });
  if (after.candidates.some((c) => c.entry_id === entryId)) fail("Lookup still returns the entry after its Delete");
  seen.delete = { deleted: deleted.deleted, lookup_after: after.candidates.length, miss_reason: after.miss_reason };
  return seen;
}

async function main() {
  if (crc32c(Buffer.from("123456789")) !== 0xe3069283) fail("the CRC-32C implementation is wrong (check value)");
  const target = env("FLEXCACHE_TARGET");
  if (!target) {
    process.stderr.write("check.mjs: set FLEXCACHE_TARGET to the daemon's host:port\n");
    return 2;
  }
  const { creds, tls, mtls } = credentials();
  const channelOptions = {};
  const serverName = env("FLEXCACHE_TLS_SERVER_NAME");
  if (serverName) channelOptions["grpc.ssl_target_name_override"] = serverName;
  const CacheService = loadService();
  const client = new CacheService(target, creds, channelOptions);
  const readTarget = env("FLEXCACHE_READ_TARGET");
  const reader = readTarget ? new CacheService(readTarget, creds, channelOptions) : client;
  const ns = namespace();
  const seen = { ok: true, node: process.version, target, read_target: readTarget || target, tls, mtls, token: Boolean(env("FLEXCACHE_TOKEN")),
                 namespace: namespaceName(ns) };
  try {
    const expected = env("FLEXCACHE_EXPECT");
    const result = expected ? await expectFailure(client, ns, expected, seen) : await fullCheck(client, reader, ns, seen);
    process.stdout.write(JSON.stringify(result) + "\n");
    return 0;
  } finally {
    client.close();
    if (reader !== client) reader.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    const reason = err instanceof CheckFailed ? err.message : `unexpected error: ${err?.stack ?? err}`;
    process.stderr.write(`check.mjs: FAIL: ${reason.replace(/\s*\n\s*/g, " | ")}\n`);
    process.exit(1);
  },
);
