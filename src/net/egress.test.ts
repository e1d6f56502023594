// A VM's DNS lookups in flight are capped (limits.maxDnsInFlight): lookups started
// together past the cap are refused as a policy denial is, and counted as denials.
import assert from "node:assert/strict";
import { test } from "node:test";
import { parseNetworkPolicy } from "../policy/network-policy.ts";
import { Egress, type Denial } from "./egress.ts";

test("lookups past maxLookupsInFlight fail EACCES naming limits.maxDnsInFlight and are reported denials; the cap frees as they answer", async () => {
  const denials: Denial[] = [];
  const egress = new Egress({
    vmName: "dns-cap",
    policy: parseNetworkPolicy({ default: "deny", rules: [{ mode: "allow", operations: ["dns"], patterns: ["db.test"] }] }),
    // Answered from the VM's hosts: no query leaves the machine, yet each lookup is in flight until its promise settles.
    hosts: new Map([["db.test", "203.0.113.7"]]),
    onDenied: (denial) => denials.push(denial),
    maxLookupsInFlight: 4,
  });
  // Ten started in the same turn: four are in flight when the fifth arrives.
  const outcomes = await Promise.allSettled(Array.from({ length: 10 }, () => egress.lookup("db.test", 7)));
  assert.equal(outcomes.filter((outcome) => outcome.status === "fulfilled").length, 4);
  for (const outcome of outcomes.slice(4)) {
    assert.equal(outcome.status, "rejected");
    const error = (outcome as PromiseRejectedResult).reason as Error & { code?: string };
    assert.equal(error.code, "EACCES");
    assert.match(error.message, /limits\.maxDnsInFlight/);
  }
  assert.equal(denials.length, 6);
  assert.deepEqual(new Set(denials.map((denial) => `${denial.operation} ${denial.rule} pid ${denial.pid}`)), new Set(["dns limits.maxDnsInFlight pid 7"]));
  // Once those answered, the VM may look up again.
  assert.deepEqual(await egress.lookup("db.test", 7), [{ address: "203.0.113.7", family: 4 }]);
});
