/**
 * After tsc: makes dist/init self-contained, because it is mounted alone into
 * every VM (at /opt/agentvm): its package.json (ES modules) and its one
 * dependency, dns-packet with ip-codec, beside it.
 */
import { cpSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
const out = new URL("../dist/init/", import.meta.url).pathname;
cpSync(new URL("../src/init/package.json", import.meta.url).pathname, join(out, "package.json"));
for (const name of ["dns-packet", "@leichtgewicht/ip-codec"]) {
  let dir: string;
  try {
    dir = dirname(require.resolve(`${name}/package.json`));
  } catch {
    continue; // not a dependency yet
  }
  mkdirSync(join(out, "node_modules", dirname(name)), { recursive: true });
  cpSync(dir, join(out, "node_modules", name), { recursive: true });
}
