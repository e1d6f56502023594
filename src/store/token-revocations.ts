/**
 * Scoped tokens are signed, not stored (auth.ts), so ending one before it
 * expires needs a record that it ended: `revoked_tokens` holds the ids of
 * tokens revoked one by one, `token_cutoffs` the time a VM was destroyed (its
 * tokens issued before then are void: the key may start a fresh VM, which the
 * old tokens must not reach). Both are read on every token check, by primary
 * key, so every server sharing the data directory sees a revocation at once.
 * Rows are deleted once the tokens they void would have expired anyway.
 */
import type { StatementSync } from "node:sqlite";
import type { SqliteStore } from "./sqlite-store.ts";

export interface TokenRevocationStore {
  isRevoked(id: string): boolean;
  /** Records a revocation; false when it was already revoked. */
  revoke(id: string, expiresAt: number): boolean;
  /** Tokens for this VM issued before this time (epoch ms) are void. */
  cutoff(definition: string, key: string): number | undefined;
  setCutoff(definition: string, key: string, notBefore: number): void;
}

export class TokenRevocations implements TokenRevocationStore {
  readonly #statements: Record<"isRevoked" | "revoke" | "cutoff" | "setCutoff" | "sweepRevoked" | "sweepCutoffs", StatementSync>;

  constructor(store: SqliteStore) {
    const db = store.db;
    this.#statements = {
      isRevoked: db.prepare("SELECT 1 AS found FROM revoked_tokens WHERE id = ?"),
      revoke: db.prepare("INSERT INTO revoked_tokens (id, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING"),
      cutoff: db.prepare("SELECT not_before FROM token_cutoffs WHERE definition = ? AND key = ?"),
      setCutoff: db.prepare("INSERT INTO token_cutoffs (definition, key, not_before) VALUES (?, ?, ?) ON CONFLICT (definition, key) DO UPDATE SET not_before = excluded.not_before"),
      sweepRevoked: db.prepare("DELETE FROM revoked_tokens WHERE expires_at <= ?"),
      sweepCutoffs: db.prepare("DELETE FROM token_cutoffs WHERE not_before <= ?"),
    };
  }

  isRevoked(id: string): boolean {
    return this.#statements.isRevoked.get(id) !== undefined;
  }

  revoke(id: string, expiresAt: number): boolean {
    return Number(this.#statements.revoke.run(id, expiresAt).changes) > 0;
  }

  cutoff(definition: string, key: string): number | undefined {
    const row = this.#statements.cutoff.get(definition, key) as { not_before: number } | undefined;
    return row === undefined ? undefined : Number(row.not_before);
  }

  setCutoff(definition: string, key: string, notBefore: number): void {
    this.#statements.setCutoff.run(definition, key, notBefore);
  }

  /** Forgets what no longer matters: revocations of expired tokens, cutoffs older than the longest token lifetime. */
  sweep(now: number, maxTokenTtlMs: number): void {
    this.#statements.sweepRevoked.run(now);
    this.#statements.sweepCutoffs.run(now - maxTokenTtlMs);
  }
}
