/**
 * Who may call the API: API keys and short-lived scoped tokens.
 *
 * API keys are long-lived secrets a backend holds (start({ auth: { apiKeys } })
 * or AGENTVM_API_KEYS). Only their SHA-256 is kept in memory; a presented key is
 * hashed and compared with every stored hash in constant time. Keys can be added
 * and revoked while the server runs.
 *
 * Tokens are what a backend hands to a browser or an agent: one VM (definition
 * and key), a set of actions (or "*"), an expiry. They are signed, not stored:
 * `avt_<base64url(JSON payload)>.<base64url(HMAC-SHA256(payload))>` with a
 * 256-bit server secret kept in `<dataDir>/token-secret` (mode 0600, created on
 * first start). Signed because checking one needs no write (every request of a
 * busy agent is checked), the same secret serves every process that shares the
 * data directory, and nothing accumulates in SQLite for tokens that are merely
 * used. Each token carries an id and its issue time: `revokeToken` records the
 * id, and destroying a VM records a cutoff for its tokens, both in SQLite
 * (token-revocations.ts) and read by primary key on each check. Keep tokens
 * short anyway (default 15 minutes, at most `auth.maxTokenTtlSeconds`); rotating
 * the secret ends them all.
 *
 * Invariant: the server is "open" (every request allowed, credentials ignored)
 * only if it never had an API key; revoking the last key does not reopen it.
 */
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { chmodSync, openSync, readFileSync, statSync, writeFileSync, closeSync } from "node:fs";
import { join } from "node:path";
import { VM_ACTIONS } from "../actions.ts";
import { canonicalKey } from "../client/client.ts";
import { AgentVmError, invalidArgument } from "../errors.ts";
import { TRANSFER_ACTIONS } from "./file-transfer-route.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";
import type { TokenRevocationStore } from "../store/token-revocations.ts";

/**
 * What a token can allow: every VM action, plus the routes that are not actions.
 * `destroy` cannot be undone, and `setLifecycle` could let an agent outlive the
 * bounds its backend set, so "*" does not include them: a token must list them.
 */
export const TOKEN_ACTIONS = [...VM_ACTIONS, ...TRANSFER_ACTIONS, "vmFetch", "connect", "status", "openTerminal", "destroy"] as const;
/** Actions a "*" token does not cover. */
const EXPLICIT_ONLY: ReadonlySet<string> = new Set(["destroy", "setLifecycle"]);
export type TokenAction = (typeof TOKEN_ACTIONS)[number];
const TOKEN_ACTION_SET: ReadonlySet<string> = new Set(TOKEN_ACTIONS);

export const API_KEY_MIN_LENGTH = 32;
export const DEFAULT_TOKEN_TTL_SECONDS = 900;
export const DEFAULT_MAX_TOKEN_TTL_SECONDS = 86_400;
const TOKEN_PREFIX = "avt_";
const SECRET_FILE = "token-secret";

export interface AuthOptions {
  /**
   * API keys (each at least 32 characters of a random secret, e.g. from
   * generateApiKey()), or `{ sha256 }` with the hex SHA-256 of a key so the
   * configuration need not hold the secret. AGENTVM_API_KEYS adds more.
   */
  apiKeys?: readonly (string | { sha256: string })[];
  /** Longest lifetime a minted token may have (default 86400 s). */
  maxTokenTtlSeconds?: number;
}

export interface TokenRequest {
  /** The definition name under setup({ use }); may be left out when the registry has one. */
  definition?: string;
  /** The VM key the token is bound to (`["a"]` and `"a"` are the same VM). */
  key: string | readonly string[];
  /** The actions it allows (VM actions, "uploadFile", "downloadFile", "uploadTar", "downloadTar", "watch", "vmFetch", "connect", "status", "openTerminal", "destroy"), or "*" (default: every one but "destroy"). */
  actions?: readonly TokenAction[] | "*";
  /** Lifetime in seconds (default 900, at most auth.maxTokenTtlSeconds). */
  expiresInSeconds?: number;
}

export interface MintedToken {
  /** Send as `Authorization: Bearer <token>` (the client's `token` option). */
  token: string;
  /** Names the token for revokeToken (DELETE /api/tokens/{id}) without handing out the token itself. */
  id: string;
  definition: string;
  key: string;
  actions: readonly TokenAction[] | "*";
  /** Epoch ms. */
  expiresAt: number;
}

export type Credential = { kind: "open" } | { kind: "apiKey" } | { kind: "token"; definition: string; key: string; actions: readonly string[] | "*"; expiresAt: number };

/** A new API key: 256 random bits, base64url, with a recognizable prefix. */
export function generateApiKey(): string {
  return `avk_${randomBytes(32).toString("base64url")}`;
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

function keyHash(entry: unknown, where: string): Buffer {
  if (typeof entry === "string") {
    if (entry.length < API_KEY_MIN_LENGTH) {
      throw invalidArgument(`${where}: an API key must be at least ${API_KEY_MIN_LENGTH} characters of a random secret (got ${entry.length}); make one with generateApiKey() or \`openssl rand -hex 32\``);
    }
    return sha256(entry);
  }
  const object = expectObject(where, entry);
  expectKnownKeys(where, object, ["sha256"]);
  if (typeof object.sha256 !== "string" || !/^[0-9a-f]{64}$/i.test(object.sha256)) throw invalidArgument(`${where}.sha256 must be 64 hex digits (the SHA-256 of the key), got ${describe(object.sha256)}`);
  return Buffer.from(object.sha256, "hex");
}

/**
 * The token secret of a data directory: read it, or create it (0600) on first
 * start. A secret readable by others is made private again.
 */
export function loadTokenSecret(dataDir: string): Buffer {
  const path = join(dataDir, SECRET_FILE);
  try {
    const fd = openSync(path, "wx", 0o600);
    try {
      writeFileSync(fd, randomBytes(32).toString("hex"));
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    if ((statSync(path).mode & 0o077) !== 0) chmodSync(path, 0o600);
  }
  const secret = Buffer.from(readFileSync(path, "utf8").trim(), "hex");
  if (secret.length < 32) throw new AgentVmError("INTERNAL", `${path} does not hold a 256-bit hex secret; delete it and restart (tokens minted before then stop working)`);
  return secret;
}

export interface AuthenticatorOptions {
  apiKeys: readonly (string | { sha256: string })[];
  secret: Buffer;
  /** Definition names the registry serves. */
  definitions: readonly string[];
  maxTokenTtlSeconds?: number;
  /** Where revocations are kept (SQLite on a server); without it no token can be revoked. */
  revocations?: TokenRevocationStore;
}

/** What a token id looks like: 128 random bits, base64url. */
const TOKEN_ID = /^[A-Za-z0-9_-]{22}$/;

export class Authenticator {
  readonly #hashes: Buffer[] = [];
  readonly #secret: Buffer;
  readonly #definitions: readonly string[];
  readonly #maxTtlSeconds: number;
  readonly #revocations: TokenRevocationStore | undefined;
  #everKeyed = false;

  constructor(options: AuthenticatorOptions) {
    this.#secret = options.secret;
    this.#revocations = options.revocations;
    this.#definitions = options.definitions;
    this.#maxTtlSeconds = options.maxTokenTtlSeconds ?? DEFAULT_MAX_TOKEN_TTL_SECONDS;
    if (!Number.isFinite(this.#maxTtlSeconds) || this.#maxTtlSeconds <= 0) throw invalidArgument(`auth.maxTokenTtlSeconds must be a positive number, got ${describe(options.maxTokenTtlSeconds)}`);
    options.apiKeys.forEach((entry, index) => this.#add(keyHash(entry, `auth.apiKeys[${index}]`)));
  }

  /** True while the server has never had an API key: every request is allowed. */
  get open(): boolean {
    return !this.#everKeyed;
  }

  addApiKey(key: string | { sha256: string }): void {
    this.#add(keyHash(key, "addApiKey"));
  }

  /** Ends a key at once; true when it was known. Accepts the key or `{ sha256 }`. */
  revokeApiKey(key: string | { sha256: string }): boolean {
    const hash = typeof key === "string" ? sha256(key) : keyHash(key, "revokeApiKey");
    const index = this.#hashes.findIndex((stored) => timingSafeEqual(stored, hash));
    if (index === -1) return false;
    this.#hashes.splice(index, 1);
    return true;
  }

  #add(hash: Buffer): void {
    this.#everKeyed = true;
    if (!this.#hashes.some((stored) => timingSafeEqual(stored, hash))) this.#hashes.push(hash);
  }

  /** Who is calling, from the Authorization header; UNAUTHENTICATED when that cannot be told. */
  authenticate(authorization: string | undefined, now = Date.now()): Credential {
    if (this.open) return { kind: "open" };
    const match = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(authorization ?? "");
    if (!match) {
      throw new AgentVmError("UNAUTHENTICATED", "this server requires a credential: send `Authorization: Bearer <API key or token>` (createClient({ endpoint, token }) or AGENTVM_TOKEN)");
    }
    const presented = match[1]!;
    if (presented.startsWith(TOKEN_PREFIX)) return this.#verifyToken(presented, now);
    const hash = sha256(presented);
    // Every stored hash is compared, so the time taken does not say which (or whether one) matched.
    let found = false;
    for (const stored of this.#hashes) found = timingSafeEqual(stored, hash) || found;
    if (!found) throw new AgentVmError("UNAUTHENTICATED", "the API key is not valid on this server (unknown or revoked)");
    return { kind: "apiKey" };
  }

  /** FORBIDDEN unless the credential covers `action` on the VM (definition, key). */
  authorize(credential: Credential, definition: string, key: string, action: string): void {
    if (credential.kind !== "token") return;
    if (credential.definition !== definition || credential.key !== key) {
      throw new AgentVmError("FORBIDDEN", `this token is for VM ${JSON.stringify(credential.key)} (${credential.definition}), not ${JSON.stringify(key)} (${definition})`);
    }
    if (credential.actions === "*" ? EXPLICIT_ONLY.has(action) : !credential.actions.includes(action)) {
      const allowed = credential.actions === "*" ? `every action but ${[...EXPLICIT_ONLY].join(", ")}, which a token must list` : credential.actions.join(", ") || "nothing";
      throw new AgentVmError("FORBIDDEN", `this token does not allow ${JSON.stringify(action)}; it allows ${allowed}`);
    }
  }

  /** FORBIDDEN unless the caller holds an API key (or the server is open). */
  requireApiKey(credential: Credential, what: string): void {
    if (credential.kind === "token") throw new AgentVmError("FORBIDDEN", `${what} needs an API key; a token cannot do it`);
  }

  mintToken(request: TokenRequest, now = Date.now()): MintedToken {
    const input = expectObject("createToken options", request);
    expectKnownKeys("createToken options", input, ["definition", "key", "actions", "expiresInSeconds"]);
    const definition = input.definition ?? (this.#definitions.length === 1 ? this.#definitions[0] : undefined);
    if (typeof definition !== "string" || !this.#definitions.includes(definition)) {
      throw invalidArgument(`createToken: definition must be one of ${this.#definitions.map((name) => JSON.stringify(name)).join(", ")}, got ${describe(input.definition)}`);
    }
    const key = canonicalKey(input.key);
    const actions = input.actions ?? "*";
    if (actions !== "*") {
      if (!Array.isArray(actions)) throw invalidArgument(`createToken: actions must be "*" or an array of action names, got ${describe(actions)}`);
      for (const action of actions) {
        if (typeof action !== "string" || !TOKEN_ACTION_SET.has(action)) throw invalidArgument(`createToken: unknown action ${describe(action)}; use one of ${TOKEN_ACTIONS.join(", ")} or "*"`);
      }
    }
    const ttl = input.expiresInSeconds ?? DEFAULT_TOKEN_TTL_SECONDS;
    if (typeof ttl !== "number" || !Number.isFinite(ttl) || ttl <= 0) throw invalidArgument(`createToken: expiresInSeconds must be a positive number, got ${describe(ttl)}`);
    if (ttl > this.#maxTtlSeconds) throw invalidArgument(`createToken: expiresInSeconds ${ttl} is above auth.maxTokenTtlSeconds (${this.#maxTtlSeconds})`);
    const expiresAt = Math.floor(now + ttl * 1000);
    const list = actions === "*" ? "*" : ([...new Set(actions as TokenAction[])] as TokenAction[]);
    const id = randomBytes(16).toString("base64url");
    const payload = Buffer.from(JSON.stringify({ v: 1, i: id, d: definition, k: key, a: list, iat: Math.floor(now), exp: expiresAt })).toString("base64url");
    const token = `${TOKEN_PREFIX}${payload}.${this.#sign(payload).toString("base64url")}`;
    return { token, id, definition, key, actions: list, expiresAt };
  }

  /**
   * Ends one token at once, named by the token itself or its id; false when it
   * was revoked already. A token (or id) that was never valid is INVALID_ARGUMENT.
   */
  revokeToken(tokenOrId: unknown, now = Date.now()): boolean {
    if (!this.#revocations) throw new AgentVmError("INTERNAL", "revokeToken: this authenticator has no revocation store");
    const { id, expiresAt } = this.revocationOf(tokenOrId, now);
    return this.#revocations.revoke(id, expiresAt);
  }

  /** What revoking this token (or id) records: its id, and until when the record matters. */
  revocationOf(tokenOrId: unknown, now = Date.now()): { id: string; expiresAt: number } {
    if (typeof tokenOrId !== "string") throw invalidArgument(`revokeToken: pass the token or its id (MintedToken.id), got ${describe(tokenOrId)}`);
    if (tokenOrId.startsWith(TOKEN_PREFIX)) {
      const claims = this.#claims(tokenOrId);
      if (typeof claims.i !== "string") throw invalidArgument("revokeToken: this token was minted before tokens had ids; it cannot be revoked alone (it expires by itself, or rotate the token secret)");
      return { id: claims.i, expiresAt: claims.exp };
    }
    if (!TOKEN_ID.test(tokenOrId)) throw invalidArgument(`revokeToken: ${describe(tokenOrId)} is neither a token (avt_…) nor a token id (22 base64url characters)`);
    // Its expiry is not known from the id: keep the record as long as any token may live.
    return { id: tokenOrId, expiresAt: now + this.#maxTtlSeconds * 1000 };
  }

  /** Voids every token for this VM issued until now (a destroyed VM's key may start afresh). */
  revokeTokensOfVm(definition: string, key: string, now = Date.now()): void {
    this.#revocations?.setCutoff(definition, key, now);
  }

  #sign(payload: string): Buffer {
    return createHmac("sha256", this.#secret).update(payload).digest();
  }

  #verifyToken(token: string, now: number): Credential {
    const claims = this.#claims(token);
    const actions = claims.a as readonly string[] | "*";
    if ((claims.exp as number) <= now) throw new AgentVmError("UNAUTHENTICATED", `the token expired at ${new Date(claims.exp as number).toISOString()}; ask for a new one`);
    if (typeof claims.i === "string" && this.#revocations?.isRevoked(claims.i)) throw new AgentVmError("UNAUTHENTICATED", "the token was revoked; ask for a new one");
    const cutoff = this.#revocations?.cutoff(claims.d as string, claims.k as string);
    if (cutoff !== undefined && (typeof claims.iat === "number" ? claims.iat : 0) < cutoff) {
      throw new AgentVmError("UNAUTHENTICATED", `the token was issued before VM ${JSON.stringify(claims.k)} was destroyed, which ended it; ask for a new one`);
    }
    return { kind: "token", definition: claims.d as string, key: claims.k as string, actions, expiresAt: claims.exp as number };
  }

  /** A token's checked claims (signature and shape; not its expiry). */
  #claims(token: string): { v: 1; i?: unknown; d: string; k: string; a: readonly string[] | "*"; iat?: unknown; exp: number } {
    const invalid = new AgentVmError("UNAUTHENTICATED", "the token is not valid on this server (malformed, or signed with another secret)");
    const dot = token.lastIndexOf(".");
    if (dot === -1) throw invalid;
    const payload = token.slice(TOKEN_PREFIX.length, dot);
    const mac = Buffer.from(token.slice(dot + 1), "base64url");
    const expected = this.#sign(payload);
    if (mac.length !== expected.length || !timingSafeEqual(mac, expected)) throw invalid;
    let claims: { v?: unknown; i?: unknown; d?: unknown; k?: unknown; a?: unknown; iat?: unknown; exp?: unknown };
    try {
      claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as typeof claims;
    } catch {
      throw invalid;
    }
    const actions = claims.a === "*" ? "*" : Array.isArray(claims.a) && claims.a.every((a) => typeof a === "string") ? (claims.a as string[]) : undefined;
    if (claims.v !== 1 || typeof claims.d !== "string" || typeof claims.k !== "string" || typeof claims.exp !== "number" || !actions) throw invalid;
    return { ...claims, v: 1, d: claims.d, k: claims.k, a: actions, exp: claims.exp };
  }
}

/** API keys from AGENTVM_API_KEYS (comma-separated; `sha256:<hex>` entries name a key by its hash). */
export function apiKeysFromEnv(value: string | undefined): (string | { sha256: string })[] {
  if (!value) return [];
  return value
    .split(",")
    .map((part) => part.trim())
    .filter((part) => part.length > 0)
    .map((part) => (part.startsWith("sha256:") ? { sha256: part.slice(7) } : part));
}

/** Hex SHA-256 of a key, for `{ sha256 }` entries and `sha256:` in AGENTVM_API_KEYS. */
export function hashApiKey(key: string): string {
  return sha256(key).toString("hex");
}
