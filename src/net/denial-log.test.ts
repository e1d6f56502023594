import assert from "node:assert/strict";
import { it } from "node:test";
import { DenialLog } from "./denial-log.ts";
import type { Denial } from "./egress.ts";

it("logs the first denials of a window in full and the rest as one count when the window ends", async () => {
  const lines: string[] = [];
  const warn = console.warn;
  console.warn = (...args: unknown[]) => void lines.push(args.join(" "));
  try {
    const denialLog = new DenialLog("loopy", { burst: 3, windowMs: 300 });
    const denial: Denial = { time: Date.now(), vm: "loopy", pid: 7, operation: "connect", destination: "203.0.113.9:80", rule: "default", reason: "no rule allows it" };
    for (let i = 0; i < 500; i++) denialLog.report(denial);
    assert.equal(lines.length, 3);
    assert.ok(lines.every((line) => line.startsWith("agentvm network denied {")));
    await new Promise((resolve) => setTimeout(resolve, 600));
    assert.equal(lines.length, 4, lines.join("\n"));
    const summary = JSON.parse(/^agentvm network denials (\{.*\})$/.exec(lines[3]!)![1]!) as { vm: string; more: number; message: string };
    assert.deepEqual([summary.vm, summary.more], ["loopy", 497]);
    assert.equal(summary.message, "497 more denials for VM loopy in the last 0.3 s");
    // A new window starts in full again.
    denialLog.report(denial);
    assert.equal(lines.length, 5);
    assert.match(lines[4]!, /^agentvm network denied /);
    denialLog.flush();
    assert.equal(lines.length, 5, "nothing suppressed, nothing to flush");
  } finally {
    console.warn = warn;
  }
});
