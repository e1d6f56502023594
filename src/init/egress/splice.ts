/**
 * Joins two byte streams as one TCP connection would be joined through a
 * proxy: both directions piped (so each side's backpressure holds the other),
 * an end passed on as a half-close, a reset passed on as a reset, and either
 * side's close or other error ending both.
 */
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";

export function splice(a: Duplex, b: Duplex): void {
  const endOther = (other: Duplex) => (error?: NodeJS.ErrnoException) => {
    if (error?.code === "ECONNRESET" && typeof (other as Socket).resetAndDestroy === "function") (other as Socket).resetAndDestroy();
    else other.destroy();
  };
  a.on("error", endOther(b));
  b.on("error", endOther(a));
  a.once("close", () => b.destroy());
  b.once("close", () => a.destroy());
  a.pipe(b);
  b.pipe(a);
}
