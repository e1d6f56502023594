/**
 * The server's durable state in SQLite (WAL): which VMs exist and when they were
 * used. A VM's files live in its directory, not here.
 *
 * Schema (version 3):
 *   meta(key PRIMARY KEY, value)                    — schema_version
 *   vms(definition, key, directory, created_at,     — one row per VM actor;
 *       last_active_at, wake_count, destroying,       destroying = 1 from the start
 *       PRIMARY KEY (definition, key))                of a destroy until the row goes
 *   previews(token_hash PRIMARY KEY, token_prefix,  — preview tokens, stored only
 *       definition, key, port, created_at,            as SHA-256; times in epoch ms
 *       expires_at, last_used_at)
 *
 * Migrations are numbered and run in order inside a transaction; statements are
 * prepared once.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync, type StatementSync } from "node:sqlite";

/** Migration n takes the schema from version n to n + 1. */
const MIGRATIONS: string[] = [
  `CREATE TABLE vms (
     definition TEXT NOT NULL,
     key TEXT NOT NULL,
     directory TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     last_active_at INTEGER NOT NULL,
     wake_count INTEGER NOT NULL DEFAULT 0,
     PRIMARY KEY (definition, key)
   );`,
  `CREATE TABLE previews (
     token_hash TEXT PRIMARY KEY,
     token_prefix TEXT NOT NULL,
     definition TEXT NOT NULL,
     key TEXT NOT NULL,
     port INTEGER NOT NULL,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     last_used_at INTEGER
   );
   CREATE INDEX previews_by_vm ON previews (definition, key, expires_at);
   CREATE INDEX previews_by_expiry ON previews (expires_at);`,
  `ALTER TABLE vms ADD COLUMN destroying INTEGER NOT NULL DEFAULT 0;`,
];

export interface VmRecord {
  definition: string;
  key: string;
  directory: string;
  createdAt: number;
  lastActiveAt: number;
  wakeCount: number;
  /** A destroy started and has not finished: the VM must not wake until one does. */
  destroying: boolean;
}

export class SqliteStore {
  readonly db: DatabaseSync;
  readonly #statements: {
    getVm: StatementSync;
    insertVm: StatementSync;
    touchVm: StatementSync;
    wokeVm: StatementSync;
    listVms: StatementSync;
    deleteVm: StatementSync;
    markDestroying: StatementSync;
    countVms: StatementSync;
  };

  constructor(dataDir: string) {
    mkdirSync(dataDir, { recursive: true });
    this.db = new DatabaseSync(join(dataDir, "agentvm.sqlite"));
    this.db.exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;");
    this.#migrate();
    this.#statements = {
      getVm: this.db.prepare("SELECT definition, key, directory, created_at, last_active_at, wake_count, destroying FROM vms WHERE definition = ? AND key = ?"),
      insertVm: this.db.prepare("INSERT INTO vms (definition, key, directory, created_at, last_active_at, wake_count) VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT DO NOTHING"),
      touchVm: this.db.prepare("UPDATE vms SET last_active_at = ? WHERE definition = ? AND key = ?"),
      wokeVm: this.db.prepare("UPDATE vms SET wake_count = wake_count + 1, last_active_at = ? WHERE definition = ? AND key = ?"),
      listVms: this.db.prepare("SELECT definition, key, directory, created_at, last_active_at, wake_count, destroying FROM vms WHERE definition = ? AND key > ? ORDER BY key LIMIT ?"),
      markDestroying: this.db.prepare("UPDATE vms SET destroying = 1 WHERE definition = ? AND key = ?"),
      deleteVm: this.db.prepare("DELETE FROM vms WHERE definition = ? AND key = ?"),
      countVms: this.db.prepare("SELECT COUNT(*) AS count FROM vms WHERE definition = ?"),
    };
  }

  #migrate(): void {
    this.db.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)");
    const row = this.db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value?: string } | undefined;
    let version = Number(row?.value ?? 0);
    for (; version < MIGRATIONS.length; version++) {
      this.db.exec("BEGIN");
      try {
        this.db.exec(MIGRATIONS[version]!);
        this.db.prepare("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value").run(String(version + 1));
        this.db.exec("COMMIT");
      } catch (error) {
        this.db.exec("ROLLBACK");
        throw error;
      }
    }
  }

  getVm(definition: string, key: string): VmRecord | undefined {
    const row = this.#statements.getVm.get(definition, key) as Record<string, unknown> | undefined;
    return row && toVmRecord(row);
  }

  /** A definition's VMs in key order, after `after` (exclusive), at most `limit` of them. */
  listVms(definition: string, after: string, limit: number): VmRecord[] {
    return (this.#statements.listVms.all(definition, after, limit) as Record<string, unknown>[]).map(toVmRecord);
  }

  countVms(definition: string): number {
    return Number((this.#statements.countVms.get(definition) as { count: number }).count);
  }

  /** Records that a destroy of this VM has begun (survives a crash until deleteVm). */
  markDestroying(definition: string, key: string): void {
    this.#statements.markDestroying.run(definition, key);
  }

  /** Forgets a VM; true when it had a row. */
  deleteVm(definition: string, key: string): boolean {
    return Number(this.#statements.deleteVm.run(definition, key).changes) > 0;
  }

  /** Records a VM (idempotent) and returns its row. */
  ensureVm(definition: string, key: string, directory: string): VmRecord {
    const now = Date.now();
    this.#statements.insertVm.run(definition, key, directory, now, now);
    return this.getVm(definition, key)!;
  }

  touchVm(definition: string, key: string): void {
    this.#statements.touchVm.run(Date.now(), definition, key);
  }

  recordWake(definition: string, key: string): void {
    this.#statements.wokeVm.run(Date.now(), definition, key);
  }

  close(): void {
    if (this.db.isOpen) this.db.close();
  }
}

function toVmRecord(row: Record<string, unknown>): VmRecord {
  return {
    definition: String(row.definition),
    key: String(row.key),
    directory: String(row.directory),
    createdAt: Number(row.created_at),
    lastActiveAt: Number(row.last_active_at),
    wakeCount: Number(row.wake_count),
    destroying: Number(row.destroying) === 1,
  };
}
