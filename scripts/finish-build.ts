/**
 * After tsc: makes dist/init self-contained, because it is mounted alone into
 * every VM (at /opt/agentvm): its package.json (ES modules) and its one
 * dependency, dns-packet with ip-codec, beside it. Also copies the dashboard's
 * static files (plain ES modules, served as they are) beside dist/server.
 */
import { cpSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";

const modules = new URL("../node_modules/", import.meta.url).pathname;
const out = new URL("../dist/init/", import.meta.url).pathname;
cpSync(new URL("../src/init/package.json", import.meta.url).pathname, join(out, "package.json"));
for (const name of ["dns-packet", "@leichtgewicht/ip-codec"]) {
  mkdirSync(join(out, "node_modules", dirname(name)), { recursive: true });
  cpSync(join(modules, name), join(out, "node_modules", name), { recursive: true });
}
cpSync(new URL("../src/dashboard/", import.meta.url).pathname, new URL("../dist/dashboard/", import.meta.url).pathname, { recursive: true });
