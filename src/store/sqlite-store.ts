/**
 * The server's durable state in SQLite (WAL): which VMs exist and when they were
 * used. A VM's files live in its directory, not here.
 *
 * Schema (version 5):
 *   meta(key PRIMARY KEY, value)                    — schema_version
 *   vms(definition, key, directory, created_at,     — one row per VM actor;
 *       last_active_at, wake_count, destroying,       destroying = 1 from the start
 *       disk_bytes, max_lifetime_s,                   of a destroy until the row goes;
 *       idle_timeout_s,                               disk_bytes as of its last sleep;
 *       PRIMARY KEY (definition, key))                the VM's own lifecycle (null: its definition's)
 *   wake_processes(id PRIMARY KEY, definition, key, — processes spawned with
 *       command, args, cwd, env, created_at)          restartOnWake (JSON args/env)
 *   revoked_tokens(id PRIMARY KEY, expires_at)      — scoped tokens revoked one by one
 *   token_cutoffs(definition, key, not_before)      — tokens for a VM issued before it
 *                                                     was destroyed (see token-revocations.ts)
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

/** The database's file name in the data directory. */
export const SQLITE_FILE = "agentvm.sqlite";

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
  `ALTER TABLE vms ADD COLUMN disk_bytes INTEGER;
   ALTER TABLE vms ADD COLUMN max_lifetime_s REAL;
   ALTER TABLE vms ADD COLUMN idle_timeout_s REAL;
   CREATE TABLE wake_processes (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     definition TEXT NOT NULL,
     key TEXT NOT NULL,
     command TEXT NOT NULL,
     args TEXT NOT NULL,
     cwd TEXT,
     env TEXT,
     created_at INTEGER NOT NULL
   );
   CREATE INDEX wake_processes_by_vm ON wake_processes (definition, key);`,
  `CREATE TABLE revoked_tokens (id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
   CREATE TABLE token_cutoffs (definition TEXT NOT NULL, key TEXT NOT NULL, not_before INTEGER NOT NULL, PRIMARY KEY (definition, key));`,
];

/** A process to start again whenever its VM wakes (spawn's restartOnWake). */
export interface WakeProcess {
  id: number;
  command: string;
  args: string[];
  cwd?: string;
  env?: Record<string, string>;
}

export interface VmRecord {
  definition: string;
  key: string;
  directory: string;
  createdAt: number;
  lastActiveAt: number;
  wakeCount: number;
  /** A destroy started and has not finished: the VM must not wake until one does. */
  destroying: boolean;
  /** Bytes its directory used when it last went to sleep; null before its first sleep. */
  diskBytes: number | null;
  /** The VM's own lifecycle bounds (setLifecycle); null where its definition's apply. */
  maxLifetimeSeconds: number | null;
  idleTimeoutSeconds: number | null;
}

export class SqliteStore {
  readonly db: DatabaseSync;
  /**
   * A number per VM that changes whenever its durable state (vm-durable-state.ts)
   * may have: its row, lifecycle, restart-on-wake processes or preview tokens.
   * Lets a cluster node tell a call that changed nothing from one that must be
   * saved, without reading the state twice per call.
   */
  readonly #changes = new Map<string, number>();
  #changeCounter = 0;
  readonly #statements: {
    getVm: StatementSync;
    insertVm: StatementSync;
    restoreVm: StatementSync;
    touchVm: StatementSync;
    wokeVm: StatementSync;
    listVms: StatementSync;
    deleteVm: StatementSync;
    markDestroying: StatementSync;
    countVms: StatementSync;
    pastLifetime: StatementSync;
    setLifecycle: StatementSync;
    setDiskBytes: StatementSync;
    insertWake: StatementSync;
    listWake: StatementSync;
    deleteWake: StatementSync;
    deleteWakeAll: StatementSync;
  };

  constructor(dataDir: string) {
    mkdirSync(dataDir, { recursive: true });
    this.db = new DatabaseSync(join(dataDir, SQLITE_FILE));
    this.db.exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;");
    this.#migrate();
    this.#statements = {
      getVm: this.db.prepare("SELECT definition, key, directory, created_at, last_active_at, wake_count, destroying, disk_bytes, max_lifetime_s, idle_timeout_s FROM vms WHERE definition = ? AND key = ?"),
      insertVm: this.db.prepare("INSERT INTO vms (definition, key, directory, created_at, last_active_at, wake_count) VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT DO NOTHING"),
      restoreVm: this.db.prepare(
        "INSERT INTO vms (definition, key, directory, created_at, last_active_at, wake_count, max_lifetime_s, idle_timeout_s) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
      ),
      touchVm: this.db.prepare("UPDATE vms SET last_active_at = ? WHERE definition = ? AND key = ?"),
      wokeVm: this.db.prepare("UPDATE vms SET wake_count = wake_count + 1, last_active_at = ? WHERE definition = ? AND key = ?"),
      listVms: this.db.prepare("SELECT definition, key, directory, created_at, last_active_at, wake_count, destroying, disk_bytes, max_lifetime_s, idle_timeout_s FROM vms WHERE definition = ? AND key > ? ORDER BY key LIMIT ?"),
      markDestroying: this.db.prepare("UPDATE vms SET destroying = 1 WHERE definition = ? AND key = ?"),
      deleteVm: this.db.prepare("DELETE FROM vms WHERE definition = ? AND key = ?"),
      countVms: this.db.prepare("SELECT COUNT(*) AS count FROM vms WHERE definition = ?"),
      pastLifetime: this.db.prepare(
        "SELECT key FROM vms WHERE definition = ? AND destroying = 0 AND created_at + COALESCE(max_lifetime_s, ?) * 1000 <= ? ORDER BY created_at LIMIT ?",
      ),
      setLifecycle: this.db.prepare("UPDATE vms SET max_lifetime_s = ?, idle_timeout_s = ? WHERE definition = ? AND key = ?"),
      setDiskBytes: this.db.prepare("UPDATE vms SET disk_bytes = ? WHERE definition = ? AND key = ?"),
      insertWake: this.db.prepare("INSERT INTO wake_processes (definition, key, command, args, cwd, env, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"),
      listWake: this.db.prepare("SELECT id, command, args, cwd, env FROM wake_processes WHERE definition = ? AND key = ? ORDER BY id"),
      deleteWake: this.db.prepare("DELETE FROM wake_processes WHERE id = ? AND definition = ? AND key = ?"),
      deleteWakeAll: this.db.prepare("DELETE FROM wake_processes WHERE definition = ? AND key = ?"),
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

  /** See #changes; 0 for a VM nothing changed in this process. */
  vmChangeCount(definition: string, key: string): number {
    return this.#changes.get(`${definition}\u0000${key}`) ?? 0;
  }

  /** Records that a VM's durable state changed (preview-store.ts calls it too). */
  noteVmChange(definition: string, key: string): void {
    this.#changes.set(`${definition}\u0000${key}`, ++this.#changeCounter);
  }

  getVm(definition: string, key: string): VmRecord | undefined {
    const row = this.#statements.getVm.get(definition, key) as Record<string, unknown> | undefined;
    return row && toVmRecord(row);
  }

  /** A definition's VMs in key order, after `after` (exclusive), at most `limit` of them. */
  listVms(definition: string, after: string, limit: number): VmRecord[] {
    return (this.#statements.listVms.all(definition, after, limit) as Record<string, unknown>[]).map(toVmRecord);
  }

  /**
   * Keys of a definition's VMs whose lifetime (their own, else `defaultSeconds`; none when both
   * are null) ended by `now`, oldest first.
   */
  vmsPastLifetime(definition: string, defaultSeconds: number | null, now: number, limit: number): string[] {
    return (this.#statements.pastLifetime.all(definition, defaultSeconds, now, limit) as { key: string }[]).map((row) => String(row.key));
  }

  setLifecycle(definition: string, key: string, maxLifetimeSeconds: number | null, idleTimeoutSeconds: number | null): void {
    this.#statements.setLifecycle.run(maxLifetimeSeconds, idleTimeoutSeconds, definition, key);
    this.noteVmChange(definition, key);
  }

  setDiskBytes(definition: string, key: string, bytes: number): void {
    this.#statements.setDiskBytes.run(bytes, definition, key);
  }

  addWakeProcess(definition: string, key: string, process: Omit<WakeProcess, "id">): number {
    this.noteVmChange(definition, key);
    const result = this.#statements.insertWake.run(
      definition,
      key,
      process.command,
      JSON.stringify(process.args),
      process.cwd ?? null,
      process.env ? JSON.stringify(process.env) : null,
      Date.now(),
    );
    return Number(result.lastInsertRowid);
  }

  wakeProcesses(definition: string, key: string): WakeProcess[] {
    return (this.#statements.listWake.all(definition, key) as Record<string, unknown>[]).map((row) => ({
      id: Number(row.id),
      command: String(row.command),
      args: JSON.parse(String(row.args)) as string[],
      ...(row.cwd !== null ? { cwd: String(row.cwd) } : {}),
      ...(row.env !== null ? { env: JSON.parse(String(row.env)) as Record<string, string> } : {}),
    }));
  }

  removeWakeProcess(definition: string, key: string, id: number): void {
    this.#statements.deleteWake.run(id, definition, key);
    this.noteVmChange(definition, key);
  }

  countVms(definition: string): number {
    return Number((this.#statements.countVms.get(definition) as { count: number }).count);
  }

  /** Records that a destroy of this VM has begun (survives a crash until deleteVm). */
  markDestroying(definition: string, key: string): void {
    this.#statements.markDestroying.run(definition, key);
    this.noteVmChange(definition, key);
  }

  /** Forgets a VM (and its restart-on-wake processes); true when it had a row. */
  deleteVm(definition: string, key: string): boolean {
    this.noteVmChange(definition, key);
    this.#statements.deleteWakeAll.run(definition, key);
    return Number(this.#statements.deleteVm.run(definition, key).changes) > 0;
  }

  /** Records a VM (idempotent) and returns its row. */
  ensureVm(definition: string, key: string, directory: string): VmRecord {
    const now = Date.now();
    if (Number(this.#statements.insertVm.run(definition, key, directory, now, now).changes) > 0) this.noteVmChange(definition, key);
    return this.getVm(definition, key)!;
  }

  /** Writes a VM's row back from a saved state (vm-durable-state.ts); the VM must have no row. */
  restoreVm(definition: string, key: string, directory: string, createdAt: number, maxLifetimeSeconds: number | null, idleTimeoutSeconds: number | null): void {
    this.#statements.restoreVm.run(definition, key, directory, createdAt, Date.now(), maxLifetimeSeconds, idleTimeoutSeconds);
    this.noteVmChange(definition, key);
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

function nullableNumber(value: unknown): number | null {
  return value === null || value === undefined ? null : Number(value);
}

function toVmRecord(row: Record<string, unknown>): VmRecord {
  return {
    definition: String(row.definition),
    key: String(row.key),
    directory: String(row.directory),
    createdAt: Number(row.created_at),
    lastActiveAt: Number(row.last_active_at),
    wakeCount: Number(row.wake_count),
    diskBytes: nullableNumber(row.disk_bytes),
    maxLifetimeSeconds: nullableNumber(row.max_lifetime_s),
    idleTimeoutSeconds: nullableNumber(row.idle_timeout_s),
    destroying: Number(row.destroying) === 1,
  };
}
