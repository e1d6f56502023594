/**
 * Preview URLs: time-limited bearer tokens that let a browser reach one port of
 * one VM through the gateway (DESIGN §3 "Preview URLs").
 *
 * A token is 160 random bits in lowercase base32: URL-safe, and usable as a
 * DNS label for subdomain previews (host names are case-insensitive, so a
 * mixed-case alphabet would not survive a browser). Only its SHA-256 is stored,
 * so a read of the database does not hand out access. Lifetimes follow the VM's
 * `preview` config, validated when the VM is defined.
 */
import { createHash, randomBytes } from "node:crypto";
import { AgentVmError, invalidArgument } from "../errors.ts";
import type { PreviewRow, PreviewStore } from "../store/preview-store.ts";
import { describe, expectKnownKeys, expectObject, expectPort } from "../validate.ts";

export interface PreviewConfig {
  /** Lifetime when createSignedPreviewUrl gets no TTL (or 0). Default 3600. */
  defaultExpiresInSeconds?: number;
  /** Longest lifetime a caller may ask for. Default 604800 (7 days), at most 3153600000 (100 years). */
  maxExpiresInSeconds?: number;
  /** Preview tokens alive at once per VM. Default 1024. */
  maxActiveTokens?: number;
}

export interface ResolvedPreviewConfig {
  defaultExpiresInSeconds: number;
  maxExpiresInSeconds: number;
  maxActiveTokens: number;
}

/** The default cap on a preview URL's lifetime: a forgotten URL stops working within a week. */
export const DEFAULT_MAX_PREVIEW_TTL_SECONDS = 7 * 86_400;
/** The cap on the cap: keeps `expiresAt` (epoch ms) far inside the safe-integer range. */
export const MAX_PREVIEW_TTL_SECONDS = 100 * 365 * 86_400;

export interface PreviewUrl {
  /**
   * The full preview URL on the preview origin, e.g. `http://localhost:6421/preview/<token>/`.
   * Always set by a registry server; on an embedded VM, once `servePreviews()` runs.
   */
  url?: string;
  /** `/preview/<token>/`: relative to the preview origin (the API origin redirects it there). */
  path: string;
  token: string;
  port: number;
  /** Epoch milliseconds. */
  expiresAt: number;
}

export interface PreviewInfo {
  /** The token's first characters, enough to tell tokens apart; not usable as a token. */
  tokenPrefix: string;
  port: number;
  createdAt: number;
  expiresAt: number;
  lastUsedAt: number | null;
}

/**
 * What a gateway path or subdomain label must look like to be looked up at all:
 * 32 random characters, and on a cluster node `-<node>`, the node that holds
 * the VM, so any node's gateway knows where to send it (src/cluster/node.ts).
 */
export const TOKEN_PATTERN = /^[a-z2-7]{32}(?:-[a-z0-9][a-z0-9-]{0,29})?$/;

/** The cluster node a token names, if any. */
export function tokenOwner(token: string): string | undefined {
  return TOKEN_PATTERN.test(token) && token.length > 33 ? token.slice(33) : undefined;
}
const TOKEN_BYTES = 20;
const BASE32 = "abcdefghijklmnopqrstuvwxyz234567";
const PREFIX_LENGTH = 6;
const PREFIX_PATTERN = /^[a-z2-7]{6}$/;

export function parsePreviewConfig(value: unknown, field = "preview"): ResolvedPreviewConfig {
  const config = value === undefined ? {} : expectObject(field, value);
  expectKnownKeys(field, config, ["defaultExpiresInSeconds", "maxExpiresInSeconds", "maxActiveTokens"]);
  const positiveInteger = (key: string, fallback: number | undefined): number | undefined => {
    const raw = config[key];
    if (raw === undefined) return fallback;
    if (typeof raw !== "number" || !Number.isInteger(raw) || raw <= 0) {
      throw invalidArgument(`${field}.${key} must be a positive integer, got ${describe(raw)}`);
    }
    if (key !== "maxActiveTokens" && raw > MAX_PREVIEW_TTL_SECONDS) {
      throw invalidArgument(`${field}.${key} must be at most ${MAX_PREVIEW_TTL_SECONDS} seconds (100 years), got ${raw}`);
    }
    return raw;
  };
  const defaultExpiresInSeconds = positiveInteger("defaultExpiresInSeconds", 3600)!;
  // Without an explicit cap, a longer default raises the cap with it rather than failing.
  const maxExpiresInSeconds = positiveInteger("maxExpiresInSeconds", Math.max(DEFAULT_MAX_PREVIEW_TTL_SECONDS, defaultExpiresInSeconds))!;
  const maxActiveTokens = positiveInteger("maxActiveTokens", 1024)!;
  if (defaultExpiresInSeconds > maxExpiresInSeconds) {
    throw invalidArgument(`${field}.defaultExpiresInSeconds (${defaultExpiresInSeconds}) must not exceed ${field}.maxExpiresInSeconds (${maxExpiresInSeconds})`);
  }
  return { defaultExpiresInSeconds, maxExpiresInSeconds, maxActiveTokens };
}

/** RFC 4648 base32, lowercase, no padding (20 bytes → 32 characters). */
function base32(bytes: Uint8Array): string {
  let out = "";
  let buffer = 0;
  let bits = 0;
  for (const byte of bytes) {
    buffer = (buffer << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += BASE32[(buffer >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += BASE32[(buffer << (5 - bits)) & 31];
  return out;
}

export function hashToken(token: string): string {
  return createHash("sha256").update(token).digest("hex");
}

/** The row for a presented token, or undefined when it is malformed, unknown, expired or revoked. */
export function findToken(store: PreviewStore, token: string, now = Date.now()): PreviewRow | undefined {
  if (!TOKEN_PATTERN.test(token)) return undefined;
  const hash = hashToken(token);
  const row = store.find(hash);
  if (!row) return undefined;
  if (row.expiresAt <= now) {
    store.delete(hash);
    return undefined;
  }
  return row;
}

/** One VM's preview tokens. */
export class PreviewTokens {
  readonly #store: PreviewStore;
  readonly #config: ResolvedPreviewConfig;
  readonly #definition: string;
  readonly #key: string;
  #origin: string | undefined;
  readonly #urlFor: ((token: string) => string) | undefined;

  readonly #owner: string | undefined;

  /**
   * `origin`: where the gateway serving these tokens listens (e.g. http://localhost:6421), when known;
   * `urlFor`: builds the URL for a token instead (a server's public URL, subdomain mode);
   * `owner`: the cluster node's name, appended to every token.
   */
  constructor(store: PreviewStore, config: ResolvedPreviewConfig, scope: { definition: string; key: string; origin?: string; urlFor?: (token: string) => string; owner?: string }) {
    this.#urlFor = scope.urlFor;
    this.#store = store;
    this.#owner = scope.owner;
    this.#config = config;
    this.#definition = scope.definition;
    this.#key = scope.key;
    this.#origin = scope.origin;
  }

  /** Sets (or clears) the origin `url`s are built on: an embedded VM learns it from servePreviews(). */
  setOrigin(origin: string | undefined): void {
    this.#origin = origin;
  }

  create(portArg: unknown, ttlArg?: unknown): PreviewUrl {
    const port = expectPort("port", portArg);
    const ttl = this.#ttl(ttlArg);
    const now = Date.now();
    const active = this.#store.countActive(this.#definition, this.#key, now);
    if (active >= this.#config.maxActiveTokens) {
      throw new AgentVmError(
        "PREVIEW_TOKEN_LIMIT",
        `createSignedPreviewUrl: this VM already has ${active} active preview URLs (preview.maxActiveTokens = ${this.#config.maxActiveTokens}); expire some with expireSignedPreviewUrl or expireAllPreviewUrls`,
      );
    }
    const token = `${base32(randomBytes(TOKEN_BYTES))}${this.#owner === undefined ? "" : `-${this.#owner}`}`;
    const expiresAt = now + Math.round(ttl * 1000);
    // #ttl bounds ttl, so this holds; checked anyway because a row past 2^53 could not be read back.
    if (!Number.isSafeInteger(expiresAt)) throw new AgentVmError("PREVIEW_TTL_INVALID", `createSignedPreviewUrl: ttlSeconds ${ttl} gives an expiry past what can be stored`);
    this.#store.insert(hashToken(token), {
      tokenPrefix: token.slice(0, PREFIX_LENGTH),
      definition: this.#definition,
      key: this.#key,
      port,
      createdAt: now,
      expiresAt,
    });
    const path = `/preview/${token}/`;
    const url = this.#urlFor ? this.#urlFor(token) : this.#origin !== undefined ? `${this.#origin}${path}` : undefined;
    return { ...(url !== undefined ? { url } : {}), path, token, port, expiresAt };
  }

  /**
   * Revokes a token of this VM; returns whether it was active. Takes the token,
   * or the `tokenPrefix` listPreviewUrls shows — whoever may list a VM's tokens
   * and expire them could expire them all anyway, so a prefix grants nothing
   * more, and it lets a listing (the dashboard) revoke one token it never held.
   */
  expire(tokenArg: unknown): boolean {
    if (typeof tokenArg !== "string" || tokenArg.length === 0 || tokenArg.length > 256) {
      throw invalidArgument(`expireSignedPreviewUrl: token must be the token string createSignedPreviewUrl returned (or its tokenPrefix from listPreviewUrls), got ${describe(tokenArg)}`);
    }
    const scope = { definition: this.#definition, key: this.#key };
    if (!PREFIX_PATTERN.test(tokenArg)) return this.#store.delete(hashToken(tokenArg), scope);
    const hashes = this.#store.findByPrefix(this.#definition, this.#key, tokenArg);
    if (hashes.length > 1) {
      throw invalidArgument(`expireSignedPreviewUrl: more than one preview URL of this VM starts with ${JSON.stringify(tokenArg)}; pass the whole token, or expireAllPreviewUrls(port)`);
    }
    return hashes.length === 1 && this.#store.delete(hashes[0]!, scope);
  }

  list(): PreviewInfo[] {
    return this.#store.listActive(this.#definition, this.#key, Date.now()).map(({ tokenPrefix, port, createdAt, expiresAt, lastUsedAt }) => ({
      tokenPrefix,
      port,
      createdAt,
      expiresAt,
      lastUsedAt,
    }));
  }

  expireAll(portArg?: unknown): number {
    const port = portArg === undefined ? undefined : expectPort("port", portArg);
    return this.#store.deleteAll(this.#definition, this.#key, port);
  }

  #ttl(value: unknown): number {
    if (value === undefined || value === null || value === 0) return this.#config.defaultExpiresInSeconds;
    if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
      throw new AgentVmError(
        "PREVIEW_TTL_INVALID",
        `createSignedPreviewUrl: ttlSeconds must be a positive number of seconds (or omitted / 0 for the default ${this.#config.defaultExpiresInSeconds}), got ${describe(value)}`,
      );
    }
    const max = this.#config.maxExpiresInSeconds;
    if (value > max) {
      throw new AgentVmError("PREVIEW_TTL_TOO_LONG", `createSignedPreviewUrl: ttlSeconds ${value} is above preview.maxExpiresInSeconds (${max}); ask for less, or raise the cap in agentOS({ preview: { maxExpiresInSeconds } })`);
    }
    return value;
  }
}
