// A real image build into a fresh cache, then programs from the image run in
// bubblewrap with nothing but the image mounted: no host program may show through.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { buildOnce } from "./cache.ts";
import { common, ensureImage, MANIFEST, parseSoftware, pi, type VmImage } from "./index.ts";

const run = promisify(execFile);
const cache = await mkdtemp(join(tmpdir(), "agentvm-image-test-"));
process.env.AGENTVM_IMAGE_DIR = cache;

let image: VmImage;
const progress: string[] = [];

before(async () => {
  image = await ensureImage({ onProgress: (line) => progress.push(line) });
});

after(() => rm(cache, { recursive: true, force: true }));

/** Runs a shell command in bwrap with only the image (and its layers) mounted. */
async function inVm(script: string, vm: VmImage = image): Promise<string> {
  const mounts = vm.entries.flatMap((entry) =>
    entry.kind === "dir" ? ["--ro-bind", join(vm.root, entry.name), `/${entry.name}`] : ["--symlink", entry.target!, `/${entry.name}`],
  );
  const layers = vm.layers.flatMap((layer) => ["--ro-bind", layer.dir, layer.mountAt]);
  const args = [
    ...["--unshare-all", "--die-with-parent", "--uid", "0", "--gid", "0", "--cap-drop", "ALL"],
    ...mounts,
    ...layers,
    ...["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/home/agentos", "--chdir", "/home/agentos"],
    ...["--clearenv", "--setenv", "PATH", vm.path, "--setenv", "HOME", "/home/agentos", "--setenv", "TZ", "UTC"],
    ...["/bin/sh", "-c", script],
  ];
  const { stdout, stderr } = await run("bwrap", args, { timeout: 60_000 });
  return stdout + stderr;
}

test("the build reports progress and records the packages it used", async () => {
  assert.match(progress.join("\n"), /downloading \d+ packages/);
  assert.match(progress.at(-1)!, /done in [\d.]+ s, \d+ MB/);
  const manifest = JSON.parse(await readFile(join(image.root, MANIFEST), "utf8"));
  assert.equal(manifest.id, image.id);
  assert.ok(manifest.packages.some((pkg: string) => pkg.startsWith("coreutils=")));
  assert.ok(!manifest.packages.some((pkg: string) => pkg.startsWith("systemd=")));
});

test("the image root is a small set of top-level entries with merged /usr", () => {
  assert.deepEqual(
    image.entries.map((entry) => `${entry.name}${entry.target ? `->${entry.target}` : ""}`),
    ["bin->usr/bin", "etc", "lib->usr/lib", "lib64->usr/lib64", "opt", "sbin->usr/sbin", "usr"],
  );
});

test("a second ensureImage is a cheap lookup with the same id", async () => {
  const started = performance.now();
  const again = await ensureImage();
  assert.equal(again.id, image.id);
  assert.ok(performance.now() - started < 100, `took ${performance.now() - started} ms`);
});

test("the shell and the base tools run from the image", async () => {
  const out = await inVm(`
    ls / | wc -l
    echo "b a" | awk '{print $2}' | sed s/a/A/ | grep A
    mkdir d && echo x > d/f && find d -type f
    echo y > g && ! diff d/f g >/dev/null && echo differ
    tar czf d.tgz d && gzip -t d.tgz && tar tzf d.tgz | head -1
    setpriv --help | grep -m1 Usage
    setpriv --reuid=0 --inh-caps=-all true && echo setpriv-ran
    ps -o comm= | sort | head -1
    readlink -f /bin/sh
  `);
  assert.match(out, /^\d+\n/);
  assert.match(out, /\nA\n/);
  assert.match(out, /d\/f\n/);
  assert.match(out, /differ\n/);
  assert.match(out, /d\/\n/);
  assert.match(out, /^Usage:$/m);
  assert.match(out, /setpriv-ran/);
  assert.match(out, /\/usr\/bin\/dash/);
});

test("git commits, curl and the pinned node and npm run", async () => {
  const out = await inVm(`
    git init -q repo && cd repo && echo hi > a && git add a &&
    git -c user.name=agent -c user.email=agent@example.com commit -qm first && git log --format=%s && git branch --show-current
    curl --version | head -1
    node --version
    npm --version
    node -e "fetch; require('node:https'); console.log('tls', require('node:tls').rootCertificates.length > 0)"
  `);
  assert.match(out, /^first\nmain\n/);
  assert.match(out, /^curl \d/m);
  assert.match(out, /^v26\./m);
  assert.match(out, /^\d+\.\d+\.\d+$/m);
  assert.match(out, /^tls true$/m);
});

test("host programs are not visible and /usr/local is empty", async () => {
  const out = await inVm(`
    command -v gcc || echo no-gcc
    command -v g++ || echo no-g++
    command -v cc || echo no-cc
    ls -A /usr/local | wc -l
    command -v python3
  `);
  assert.match(out, /^no-gcc\nno-g\+\+\nno-cc\n0\n\/usr\/bin\/python3\n$/);
});

test("the CA bundle, passwd and placeholder files are in place", async () => {
  const etc = join(image.root, "etc");
  assert.match(await readFile(join(etc, "ssl/certs/ca-certificates.crt"), "utf8"), /BEGIN CERTIFICATE/);
  assert.match(await readFile(join(etc, "passwd"), "utf8"), /^root:x:0:0:root:\/home\/agentos:\/bin\/sh$/m);
  for (const file of ["resolv.conf", "hosts"]) {
    const info = await stat(join(etc, file));
    assert.ok(info.isFile() && info.size === 0, `${file} is an empty regular file`);
  }
  assert.ok(!existsSync(join(image.root, "usr/share/doc")));
});

test("buildOnce builds once for concurrent callers and leaves nothing after a failure", async () => {
  const dir = join(cache, "once");
  let builds = 0;
  const build = async (tmp: string): Promise<void> => {
    builds++;
    await new Promise((resolve) => setTimeout(resolve, 100));
    await import("node:fs/promises").then((fs) => fs.writeFile(join(tmp, "x"), "x"));
  };
  await Promise.all([buildOnce(dir, build), buildOnce(dir, build)]);
  assert.equal(builds, 1);
  const failing = join(cache, "failing");
  await assert.rejects(
    buildOnce(failing, () => Promise.reject(Object.assign(new Error("disk full"), { code: "ENOSPC" }))),
    (error: { code?: string; message?: string }) => error.code === "IMAGE_BUILD_FAILED" && /no space left/.test(error.message ?? ""),
  );
  assert.ok(!existsSync(failing));
  assert.deepEqual((await readdir(cache)).filter((name) => name.startsWith(".")), []);
});

test("parseSoftware accepts descriptors, names and agentOS packages", () => {
  assert.deepEqual(parseSoftware([common, pi]), [common, pi]);
  assert.deepEqual(parseSoftware(["pi", "common", pi]), [pi, common]);
  assert.deepEqual(parseSoftware([{ name: "@rivet-dev/agent-os-common" }, { packageName: "@rivet-dev/agent-os-pi" }]), [common, pi]);
  assert.deepEqual(parseSoftware([{ default: { package: { name: "@rivet-dev/agent-os-pi" } } }]), [pi]);
  assert.deepEqual(parseSoftware(undefined), []);
  assert.ok(Object.isFrozen(pi));
});

test("parseSoftware refuses unknown entries, naming the index and what is available", () => {
  for (const bad of [["emacs"], [common, { name: "@rivet-dev/agent-os-emacs" }], [42], [null], "pi"]) {
    assert.throws(
      () => parseSoftware(bad, "options.software"),
      (error: { code?: string; message?: string }) => error.code === "INVALID_ARGUMENT" && /options\.software/.test(error.message!) && /common/.test(error.message!),
    );
  }
  assert.throws(() => parseSoftware([common, "vim"]), /software\[1\].*Available: common.*pi/);
});

test("the pi layer installs once and runs in the VM", { timeout: 600_000 }, async () => {
  const withPi = await ensureImage({ software: [pi], onProgress: () => {} });
  assert.equal(withPi.id, image.id);
  assert.deepEqual(
    withPi.layers.map((layer) => layer.mountAt),
    ["/opt/software/pi"],
  );
  assert.match(withPi.path, /^\/opt\/node\/bin:\/opt\/software\/pi\/bin:/);
  assert.match(await inVm("pi --version", withPi), /^\d+\.\d+\.\d+$/m);
});
