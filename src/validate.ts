/**
 * Argument checks shared by every public entry point. Each throws
 * INVALID_ARGUMENT naming the argument, what it got and what it takes, before any
 * side effect happens.
 */
import { invalidArgument } from "./errors.ts";

export function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (value instanceof Uint8Array) return `a Uint8Array of ${value.byteLength} bytes`;
  if (typeof value === "string") return value.length > 40 ? `a string of ${value.length} characters` : JSON.stringify(value);
  if (typeof value === "number") return String(value);
  return typeof value;
}

export function expectString(name: string, value: unknown, opts: { nonEmpty?: boolean; max?: number } = {}): string {
  if (typeof value !== "string") throw invalidArgument(`${name} must be a string, got ${describe(value)}`);
  if (opts.nonEmpty && value.length === 0) throw invalidArgument(`${name} must not be empty`);
  if (opts.max !== undefined && value.length > opts.max) {
    throw invalidArgument(`${name} is ${value.length} characters long; the limit is ${opts.max}`);
  }
  if (value.includes("\0")) throw invalidArgument(`${name} must not contain NUL characters`);
  return value;
}

export function expectInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    throw invalidArgument(`${name} must be an integer from ${min} to ${max}, got ${describe(value)}`);
  }
  return value;
}

export function expectPort(name: string, value: unknown): number {
  return expectInteger(name, value, 1, 65535);
}

export function expectObject(name: string, value: unknown): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw invalidArgument(`${name} must be an object, got ${describe(value)}`);
  }
  return value as Record<string, unknown>;
}

/** Rejects keys a caller probably misspelt, naming them and the keys that exist. */
export function expectKnownKeys(name: string, value: Record<string, unknown>, known: readonly string[]): void {
  // An object whose prototype is not a plain object's (`{"__proto__": {…}}` assigned
  // somewhere) would hand its prototype's keys to every `options.x` read.
  const prototype: unknown = Object.getPrototypeOf(value);
  if (prototype !== Object.prototype && prototype !== null) {
    throw invalidArgument(`${name} must be a plain object (its prototype was replaced, e.g. by a "__proto__" key)`);
  }
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) {
      throw invalidArgument(`${name}.${key} is not a known option; expected one of: ${known.join(", ")}`);
    }
  }
}

export function expectStringArray(name: string, value: unknown): string[] {
  if (!Array.isArray(value)) throw invalidArgument(`${name} must be an array of strings, got ${describe(value)}`);
  value.forEach((item, i) => expectString(`${name}[${i}]`, item));
  return value as string[];
}

export function expectStringRecord(name: string, value: unknown): Record<string, string> {
  const record = expectObject(name, value);
  for (const [key, item] of Object.entries(record)) expectString(`${name}.${key}`, item);
  return record as Record<string, string>;
}

export function toBytes(name: string, value: unknown): Uint8Array {
  if (typeof value === "string") return Buffer.from(value, "utf8");
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw invalidArgument(`${name} must be a string or a Uint8Array, got ${describe(value)}`);
}
