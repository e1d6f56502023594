/**
 * Preview token rows (table `previews`, see sqlite-store.ts). Tokens are never
 * stored: only their SHA-256, plus a short prefix so people can tell them apart
 * in listings. Statements are prepared once.
 */
import type { StatementSync } from "node:sqlite";
import type { SqliteStore } from "./sqlite-store.ts";

export interface PreviewRow {
  tokenPrefix: string;
  definition: string;
  key: string;
  port: number;
  createdAt: number;
  expiresAt: number;
  lastUsedAt: number | null;
}

export class PreviewStore {
  readonly #store: SqliteStore;
  readonly #statements: Record<"insert" | "find" | "countActive" | "listActive" | "deleteOne" | "deleteAll" | "deleteAllPort" | "sweep" | "touch" | "deleteOneScoped" | "findByPrefix" | "listActiveHashes", StatementSync>;

  constructor(store: SqliteStore) {
    this.#store = store;
    const db = store.db;
    // expires_at is read clamped: a row written before TTLs were capped may hold a number past
    // 2^53, which node:sqlite refuses to read (every listing of that VM would fail).
    const columns = `token_prefix, definition, key, port, created_at, MIN(expires_at, ${Number.MAX_SAFE_INTEGER}) AS expires_at, last_used_at`;
    const insertColumns = "token_prefix, definition, key, port, created_at, expires_at, last_used_at";
    this.#statements = {
      insert: db.prepare(`INSERT INTO previews (token_hash, ${insertColumns}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)`),
      find: db.prepare(`SELECT ${columns} FROM previews WHERE token_hash = ?`),
      countActive: db.prepare("SELECT COUNT(*) AS count FROM previews WHERE definition = ? AND key = ? AND expires_at > ?"),
      listActive: db.prepare(`SELECT ${columns} FROM previews WHERE definition = ? AND key = ? AND expires_at > ? ORDER BY created_at`),
      listActiveHashes: db.prepare(`SELECT token_hash, ${columns} FROM previews WHERE definition = ? AND key = ? AND expires_at > ? ORDER BY created_at`),
      deleteOne: db.prepare("DELETE FROM previews WHERE token_hash = ?"),
      findByPrefix: db.prepare("SELECT token_hash FROM previews WHERE definition = ? AND key = ? AND token_prefix = ? LIMIT 2"),
      deleteOneScoped: db.prepare("DELETE FROM previews WHERE token_hash = ? AND definition = ? AND key = ?"),
      deleteAll: db.prepare("DELETE FROM previews WHERE definition = ? AND key = ?"),
      deleteAllPort: db.prepare("DELETE FROM previews WHERE definition = ? AND key = ? AND port = ?"),
      sweep: db.prepare("DELETE FROM previews WHERE expires_at <= ?"),
      touch: db.prepare("UPDATE previews SET last_used_at = ? WHERE token_hash = ?"),
    };
  }

  insert(hash: string, row: Omit<PreviewRow, "lastUsedAt">): void {
    this.#statements.insert.run(hash, row.tokenPrefix, row.definition, row.key, row.port, row.createdAt, row.expiresAt);
    this.#store.noteVmChange(row.definition, row.key);
  }

  find(hash: string): PreviewRow | undefined {
    const row = this.#statements.find.get(hash) as Record<string, unknown> | undefined;
    return row && toRow(row);
  }

  countActive(definition: string, key: string, now: number): number {
    return Number((this.#statements.countActive.get(definition, key, now) as { count: number }).count);
  }

  listActive(definition: string, key: string, now: number): PreviewRow[] {
    return (this.#statements.listActive.all(definition, key, now) as Record<string, unknown>[]).map(toRow);
  }

  /** Like listActive, with each row's token hash (what a saved VM state keeps, vm-durable-state.ts). */
  listActiveHashes(definition: string, key: string, now: number): (PreviewRow & { hash: string })[] {
    return (this.#statements.listActiveHashes.all(definition, key, now) as Record<string, unknown>[]).map((row) => ({ ...toRow(row), hash: String(row.token_hash) }));
  }

  /** Deletes one token; scoped to a VM unless `definition` is omitted. Returns whether it existed. */
  delete(hash: string, scope?: { definition: string; key: string }): boolean {
    // An unscoped delete is an expired token's: a saved state drops expired tokens by itself.
    const result = scope ? this.#statements.deleteOneScoped.run(hash, scope.definition, scope.key) : this.#statements.deleteOne.run(hash);
    if (scope && Number(result.changes) > 0) this.#store.noteVmChange(scope.definition, scope.key);
    return Number(result.changes) > 0;
  }

  /** The hashes of a VM's tokens that start with `prefix` (at most two: enough to tell one from many). */
  findByPrefix(definition: string, key: string, prefix: string): string[] {
    return (this.#statements.findByPrefix.all(definition, key, prefix) as { token_hash: string }[]).map((row) => String(row.token_hash));
  }

  deleteAll(definition: string, key: string, port?: number): number {
    const result = port === undefined ? this.#statements.deleteAll.run(definition, key) : this.#statements.deleteAllPort.run(definition, key, port);
    if (Number(result.changes) > 0) this.#store.noteVmChange(definition, key);
    return Number(result.changes);
  }

  sweep(now: number): number {
    return Number(this.#statements.sweep.run(now).changes);
  }

  touch(hash: string, now: number): void {
    this.#statements.touch.run(now, hash);
  }
}

function toRow(row: Record<string, unknown>): PreviewRow {
  return {
    tokenPrefix: String(row.token_prefix),
    definition: String(row.definition),
    key: String(row.key),
    port: Number(row.port),
    createdAt: Number(row.created_at),
    expiresAt: Number(row.expires_at),
    lastUsedAt: row.last_used_at === null ? null : Number(row.last_used_at),
  };
}
