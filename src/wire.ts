/**
 * How action arguments and results cross HTTP between client and server —
 * binary-safe without base64 blow-up. Shared by both sides and free of Node-only
 * APIs so the client also runs in browsers.
 *
 * JSON carries everything; a byte array inside a value is written as
 * `{ "$bytes": n }` and its bytes travel after the JSON in an envelope:
 *
 *   Content-Type: application/vnd.agentvm.envelope
 *   u32 big-endian JSON length | JSON { value, parts: [len…] } | part 0 | part 1 | …
 *
 * NaN, Infinity and -Infinity, which JSON cannot hold, are written
 * `{ "$number": "NaN" }` (and so on) in both formats.
 *
 * Plain `application/json` is accepted too (for curl and other languages), with
 * bytes written as `{ "$base64": "…" }`; the server answers in the format the
 * request's Accept header asks for.
 */

export const ENVELOPE_TYPE = "application/vnd.agentvm.envelope";

/**
 * On the vmFetch route: the request header naming (as a JSON array) the headers
 * the caller set itself, so that headers a fetch implementation adds on its own
 * (user-agent, accept-encoding, sec-fetch-*) do not reach the guest.
 */
export const FORWARD_HEADERS = "x-agentvm-forward-headers";
/**
 * …and when that header is present, the guest's Content-Encoding travels under
 * this name, so fetch hands the client the guest's bytes as they were sent.
 */
export const CONTENT_ENCODING = "x-agentvm-content-encoding";
/**
 * The caller's credential for the server when `Authorization` belongs to the
 * guest: the client sends its token here on the vmFetch route, so a guest's own
 * `Authorization` header passes through. Never forwarded. Takes precedence
 * over `Authorization` on every route.
 */
export const AUTH_HEADER = "x-agentvm-authorization";
/** On the vmFetch route: the request's `timeoutMs` (not forwarded to the guest). */
export const FETCH_TIMEOUT = "x-agentvm-timeout-ms";

/*
 * The terminal route (server: src/server/terminal-route.ts, client: src/client/terminal.ts):
 * a WebSocket whose binary frames are the terminal's bytes and whose text frames are
 * the JSON control messages below.
 */
/** The WebSocket subprotocol both sides name. */
export const TERMINAL_PROTOCOL = "agentvm.terminal.v1";
/** A second subprotocol `agentvm.auth.<base64url credential>`: browsers cannot set headers on a WebSocket. */
export const AUTH_PROTOCOL_PREFIX = "agentvm.auth.";
/** The close code after an `error` message. */
export const TERMINAL_ERROR_CLOSE = 4000;
/** Client → server text frames. */
export type TerminalClientMessage = { type: "resize"; cols: number; rows: number } | { type: "kill"; signal?: string } | { type: "close" };
/** Server → client text frames: `ready` first, then `exit` (close 1000) or `error` (close TERMINAL_ERROR_CLOSE). */
export type TerminalServerMessage =
  | { type: "ready"; pid: number; cols: number; rows: number }
  | { type: "exit"; exitCode: number; signal: string | null }
  | { type: "error"; error: unknown };

/*
 * The streamed exec (server: src/server/exec-stream.ts, client: src/client/exec-stream.ts):
 * the exec action asked with this Accept type answers one JSON line per ExecStreamLine.
 */
export const EXEC_STREAM_TYPE = "application/x-ndjson";
export type ExecStreamLine =
  | { type: "output"; stream: "stdout" | "stderr"; /** base64 */ data: string }
  | { type: "result"; value: { pid: number; exitCode: number } }
  | { type: "error"; error: unknown };

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function isBytes(value: unknown): value is Uint8Array {
  return value instanceof Uint8Array;
}

function hasBytes(value: unknown): boolean {
  if (isBytes(value) || value instanceof ArrayBuffer) return true;
  if (Array.isArray(value)) return value.some(hasBytes);
  if (value && typeof value === "object") return Object.values(value).some(hasBytes);
  return false;
}

/**
 * Sets an own property, even one named "__proto__": assignment would make that
 * key the object's prototype, and it would slip past known-key checks unseen.
 */
function defineOwn(target: Record<string, unknown>, key: string, value: unknown): void {
  Object.defineProperty(target, key, { value, enumerable: true, writable: true, configurable: true });
}

function replaceBytes(value: unknown, onBytes: (bytes: Uint8Array) => Json): Json {
  if (isBytes(value)) return onBytes(value);
  if (value instanceof ArrayBuffer) return onBytes(new Uint8Array(value));
  if (Array.isArray(value)) return value.map((item) => replaceBytes(item, onBytes));
  if (value && typeof value === "object") {
    const out: Record<string, Json> = {};
    for (const [key, item] of Object.entries(value)) if (item !== undefined) defineOwn(out, key, replaceBytes(item, onBytes));
    return out;
  }
  // JSON has no NaN or ±Infinity (JSON.stringify writes null), so they travel
  // tagged: a ttl of NaN must reach the server as NaN, not as "omitted".
  if (typeof value === "number" && !Number.isFinite(value)) return { $number: String(value) };
  return value === undefined ? null : (value as Json);
}

/** Deepest nesting a decoded value may have: no argument needs more, and recursion must stay far from the stack's end. */
export const MAX_VALUE_DEPTH = 64;

function restoreBytes(value: unknown, fromRef: (ref: { $bytes?: unknown; $base64?: unknown }) => Uint8Array | undefined, depth = 0): unknown {
  if (depth > MAX_VALUE_DEPTH && value !== null && typeof value === "object") throw new WireFormatError(`the value is nested more than ${MAX_VALUE_DEPTH} levels deep`);
  if (Array.isArray(value)) return value.map((item) => restoreBytes(item, fromRef, depth + 1));
  if (value && typeof value === "object") {
    const keys = Object.keys(value);
    const tagged = (value as { $number?: unknown }).$number;
    if (keys.length === 1 && (tagged === "NaN" || tagged === "Infinity" || tagged === "-Infinity")) return Number(tagged);
    if (keys.length === 1 && (keys[0] === "$bytes" || keys[0] === "$base64")) {
      const bytes = fromRef(value as { $bytes?: unknown; $base64?: unknown });
      if (bytes) return bytes;
    }
    const out: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) defineOwn(out, key, restoreBytes(item, fromRef, depth + 1));
    return out;
  }
  return value;
}

export function toBase64(bytes: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function fromBase64(text: string): Uint8Array {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export interface Encoded {
  contentType: string;
  body: Uint8Array | string;
}

/** Encodes a value: JSON when it holds no bytes (or base64 is asked for), else an envelope. */
export function encodeValue(value: unknown, options: { base64?: boolean } = {}): Encoded {
  if (!hasBytes(value)) return { contentType: "application/json", body: JSON.stringify({ value: replaceBytes(value, () => null) }) };
  if (options.base64) {
    return { contentType: "application/json", body: JSON.stringify({ value: replaceBytes(value, (bytes) => ({ $base64: toBase64(bytes) })) }) };
  }
  const parts: Uint8Array[] = [];
  const json = replaceBytes(value, (bytes) => {
    parts.push(bytes);
    return { $bytes: parts.length - 1 };
  });
  const header = new TextEncoder().encode(JSON.stringify({ value: json, parts: parts.map((part) => part.byteLength) }));
  const total = 4 + header.byteLength + parts.reduce((sum, part) => sum + part.byteLength, 0);
  const body = new Uint8Array(total);
  new DataView(body.buffer).setUint32(0, header.byteLength);
  body.set(header, 4);
  let offset = 4 + header.byteLength;
  for (const part of parts) {
    body.set(part, offset);
    offset += part.byteLength;
  }
  return { contentType: ENVELOPE_TYPE, body };
}

export class WireFormatError extends Error {}

/** Decodes a body written by encodeValue (or by hand as JSON `{ "value": … }` / a bare JSON array of args). */
export function decodeValue(contentType: string, body: Uint8Array): unknown {
  if (contentType.startsWith(ENVELOPE_TYPE)) {
    if (body.byteLength < 4) throw new WireFormatError("envelope shorter than its 4-byte header");
    const length = new DataView(body.buffer, body.byteOffset, body.byteLength).getUint32(0);
    if (4 + length > body.byteLength) throw new WireFormatError("envelope JSON length runs past the body");
    const header = JSON.parse(new TextDecoder().decode(body.subarray(4, 4 + length))) as { value?: unknown; parts?: unknown };
    const sizes = Array.isArray(header.parts) ? header.parts.map(Number) : [];
    const parts: Uint8Array[] = [];
    let offset = 4 + length;
    for (const size of sizes) {
      if (!Number.isInteger(size) || size < 0 || offset + size > body.byteLength) throw new WireFormatError("envelope part runs past the body");
      parts.push(body.subarray(offset, offset + size));
      offset += size;
    }
    return restoreBytes(header.value, (ref) => (typeof ref.$bytes === "number" ? parts[ref.$bytes] : undefined));
  }
  const text = new TextDecoder().decode(body);
  const parsed = text.trim() === "" ? { value: null } : (JSON.parse(text) as unknown);
  if (!Array.isArray(parsed) && (parsed === null || typeof parsed !== "object" || !Object.hasOwn(parsed, "value"))) {
    throw new WireFormatError('expected a JSON array or an object with a "value" key');
  }
  const value = Array.isArray(parsed) ? parsed : (parsed as { value?: unknown }).value;
  return restoreBytes(value, (ref) => (typeof ref.$base64 === "string" ? fromBase64(ref.$base64) : undefined));
}
