/**
 * After tsc: makes dist/init self-contained, because it is mounted alone into
 * every VM (at /opt/agentvm): its package.json (ES modules) and its
 * dependencies beside it: dns-packet with ip-codec, and @lydell/node-pty with
 * the prebuilt addon for this platform (an N-API binary, so it loads in the
 * guest's Node whatever the host's; guests run on the host's architecture).
 * Also copies the dashboard's static files (plain ES modules, served as they
 * are) beside dist/server.
 */
import { cpSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// fileURLToPath, not .pathname: a checkout under a path with spaces must build too.
const path = (relative: string) => fileURLToPath(new URL(relative, import.meta.url));

const modules = path("../node_modules/");
const out = path("../dist/init/");
cpSync(path("../src/init/package.json"), join(out, "package.json"));
for (const name of ["dns-packet", "@leichtgewicht/ip-codec", "@lydell/node-pty", `@lydell/node-pty-${process.platform}-${process.arch}`]) {
  mkdirSync(join(out, "node_modules", dirname(name)), { recursive: true });
  cpSync(join(modules, name), join(out, "node_modules", name), { recursive: true });
}
cpSync(path("../src/dashboard/"), path("../dist/dashboard/"), { recursive: true });
