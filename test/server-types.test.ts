/**
 * Runs the type checker over the client type test (test/types/client-types.ts)
 * and over the whole project. The full `tsc --noEmit -p .` takes well under a
 * second here (TypeScript 7), so it runs as is.
 *
 * An unused `@ts-expect-error` is itself a tsc error, so a wrong-argument line
 * that starts to type-check fails these tests. The last test also removes the
 * directives and checks that each one was covering exactly one error on its
 * own line — not, say, a typo elsewhere in the statement.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, realpath, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, it } from "node:test";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const TSC = join(REPO, "node_modules/.bin/tsc");
const TYPE_TEST = join(REPO, "test/types/client-types.ts");
const DIRECTIVE = "// @ts-expect-error";

let dir: string;

before(async () => {
  // A directory outside the repo that resolves `agentvm` the way a user's project does.
  dir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-types-")));
  await mkdir(join(dir, "node_modules"));
  await symlink(REPO, join(dir, "node_modules/agentvm"), "dir");
  await writeFile(join(dir, "package.json"), JSON.stringify({ name: "type-test", private: true, type: "module" }));
});

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

function tsc(args: string[], cwd = REPO): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(TSC, args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), 50_000);
    child.once("error", reject);
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

/** Type-checks one file with the repo's compiler options and returns tsc's result. */
async function checkFile(name: string, source: string) {
  await writeFile(join(dir, name), source);
  const config = {
    extends: join(REPO, "tsconfig.json"),
    compilerOptions: { noEmit: true, typeRoots: [join(REPO, "node_modules/@types")] },
    files: [join(dir, name)],
    include: [],
  };
  await writeFile(join(dir, `tsconfig.${name}.json`), JSON.stringify(config));
  return tsc(["-p", join(dir, `tsconfig.${name}.json`)]);
}

/** Errors tsc reported in `name`, as line numbers (1-based) and codes. */
function errorsIn(output: string, name: string): { line: number; code: string }[] {
  const pattern = new RegExp(`${name.replace(/[.]/g, "\\.")}\\((\\d+),\\d+\\): error (TS\\d+)`, "g");
  return [...output.matchAll(pattern)].map((match) => ({ line: Number(match[1]), code: match[2]! }));
}

it("the client type test checks: correct calls have the asserted types, every @ts-expect-error is needed", async () => {
  const source = await readFile(TYPE_TEST, "utf8");
  const { code, output } = await checkFile("client-types.ts", source);
  assert.equal(code, 0, output);
});

it("each @ts-expect-error covers exactly one error, on the line below it", async () => {
  const source = await readFile(TYPE_TEST, "utf8");
  const lines = source.split("\n");
  const expected = lines.flatMap((line, index) => (line.trim().startsWith(DIRECTIVE) ? [index + 2] : []));
  assert.ok(expected.length >= 10, `expected the type test to hold its @ts-expect-error lines, found ${expected.length}`);
  const stripped = lines.map((line) => (line.trim().startsWith(DIRECTIVE) ? "" : line)).join("\n");
  const { code, output } = await checkFile("stripped.ts", stripped);
  assert.notEqual(code, 0);
  const errors = errorsIn(output, "stripped.ts");
  assert.deepEqual(
    [...new Set(errors.map((error) => error.line))].sort((a, b) => a - b),
    expected,
    `errors without the directives:\n${output}`,
  );
  assert.equal(errors.length, expected.length, `more than one error on a directive's line:\n${output}`);
});

it("the whole project type-checks (tsc --noEmit -p .)", async () => {
  const { code, output } = await tsc(["--noEmit", "-p", "."]);
  assert.equal(code, 0, output);
});
