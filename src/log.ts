/**
 * The server's structured log: one JSON object per line, on stdout for `info`
 * and `debug`, on stderr for `warn` and `error`, with `time` (ISO 8601),
 * `level` and `msg` first. Lines below the level set with
 * `registry.start({ logLevel })` or AGENTVM_LOG_LEVEL (default "warn") are
 * not written; access logs are `info`, so they are off unless asked for.
 */
import { invalidArgument } from "./errors.ts";

export const LOG_LEVELS = ["debug", "info", "warn", "error", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3, silent: 4 };

let threshold: LogLevel = "warn";

/** Parses a level from an option (wins) or the environment. */
export function parseLogLevel(option: unknown, env: string | undefined = process.env.AGENTVM_LOG_LEVEL): LogLevel {
  const raw = option ?? (env === undefined || env === "" ? "warn" : env.trim().toLowerCase());
  if (typeof raw !== "string" || !(LOG_LEVELS as readonly string[]).includes(raw)) {
    throw invalidArgument(`${option !== undefined ? "start options.logLevel" : "AGENTVM_LOG_LEVEL"} must be one of ${LOG_LEVELS.join(", ")}, got ${JSON.stringify(raw)}`);
  }
  return raw as LogLevel;
}

/** Sets the process-wide level (the server does at start). */
export function setLogLevel(level: LogLevel): void {
  threshold = level;
}

export function logEnabled(level: Exclude<LogLevel, "silent">): boolean {
  return RANK[level] >= RANK[threshold];
}

export function log(level: Exclude<LogLevel, "silent">, msg: string, fields: Record<string, unknown> = {}): void {
  if (!logEnabled(level)) return;
  const line = JSON.stringify({ time: new Date().toISOString(), level, msg, ...fields });
  if (level === "warn" || level === "error") process.stderr.write(`${line}\n`);
  else process.stdout.write(`${line}\n`);
}
