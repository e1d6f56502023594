// The error codes are part of the API: the code list, docs/errors.md and the
// HTTP statuses must agree.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { AGENTVM_CODES, AgentVmError, POSIX_CODES, type ErrorCode } from "./errors.ts";
import { httpStatus } from "./server/http-api.ts";

const doc = readFileSync(new URL("../docs/errors.md", import.meta.url), "utf8");
const rows = [...doc.matchAll(/^\| `([A-Z_]+)` \| .+ \| (\d{3}|—) \|$/gm)].map((match) => ({ code: match[1]!, status: match[2]! }));

test("docs/errors.md lists exactly the exported codes", () => {
  assert.deepEqual(rows.map((row) => row.code).sort(), [...POSIX_CODES, ...AGENTVM_CODES].sort());
});

test("docs/errors.md states the HTTP status each code is answered with", () => {
  for (const { code, status } of rows) {
    if (status === "—") continue; // client-side only
    assert.equal(httpStatus(code as ErrorCode), Number(status), `status of ${code}`);
  }
});

test("errors survive a trip through JSON with code and message", () => {
  const original = new AgentVmError("ECONNREFUSED", "vmFetch: nothing is listening on port 3000");
  const back = AgentVmError.from(JSON.parse(JSON.stringify(original)));
  assert.equal(back.code, "ECONNREFUSED");
  assert.equal(back.message, original.message);
  assert.equal(AgentVmError.from({ code: "NOT_A_CODE", message: "x" }).code, "INTERNAL");
});
