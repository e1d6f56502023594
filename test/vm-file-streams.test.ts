/**
 * The embedded stream methods of Vm (no server): a write stream that is
 * destroyed leaves nothing, reads by range, append rollback, tar both ways,
 * and a watch iterated in process.
 */
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { before, describe, it } from "node:test";
import type { Vm } from "agentvm";
import { rejection, tempDataDir, testVm, text } from "./helpers.ts";

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

describe("Vm stream methods", () => {
  let vm: Vm;
  let home: string;

  before(async () => {
    vm = await testVm(await tempDataDir("agentvm-streams-"));
    home = join(vm.root, "home", "agentos");
  });

  it("a write stream lands on end(); destroyed, it leaves nothing", async () => {
    const complete = await vm.openWriteStream("/home/agentos/complete.txt", { mode: 0o640 });
    await pipeline(Readable.from([Buffer.from("a"), Buffer.from("b")]), complete);
    assert.equal(text(await vm.readFile("/home/agentos/complete.txt")), "ab");
    assert.equal((await vm.stat("/home/agentos/complete.txt")).mode & 0o777, 0o640);

    const broken = await vm.openWriteStream("/home/agentos/broken.txt");
    broken.write("partial");
    assert.equal(await vm.exists("/home/agentos/broken.txt"), false, "nothing under the name before end()");
    broken.on("error", () => {});
    broken.destroy(new Error("the source failed"));
    await new Promise((resolve) => broken.once("close", resolve));
    assert.equal(await vm.exists("/home/agentos/broken.txt"), false);
    assert.deepEqual(readdirSync(home).filter((name) => name.startsWith(".agentvm-")), []);
  });

  it("an append that is destroyed is cut back to the old length", async () => {
    await vm.writeFile("/home/agentos/log", "kept\n");
    const appending = await vm.openWriteStream("/home/agentos/log", { append: true });
    await new Promise<void>((resolve, reject) => appending.write("lost\n", (error) => (error ? reject(error) : resolve())));
    appending.destroy();
    await new Promise((resolve) => appending.once("close", resolve));
    assert.equal(text(await vm.readFile("/home/agentos/log")), "kept\n");
  });

  it("reads by range", async () => {
    await vm.writeFile("/home/agentos/digits", "0123456789");
    const middle = await vm.openReadStream("/home/agentos/digits", { start: 2, end: 5 });
    assert.deepEqual([middle.size, middle.start, middle.end], [10, 2, 5]);
    assert.equal((await collect(middle.stream)).toString(), "2345");
    const tail = await vm.openReadStream("/home/agentos/digits", { start: 7 });
    assert.equal((await collect(tail.stream)).toString(), "789");
    assert.equal((await rejection(vm.openReadStream("/home/agentos/digits", { start: 10 }))).code, "RANGE_NOT_SATISFIABLE");
    await vm.writeFile("/home/agentos/empty", "");
    assert.equal((await collect((await vm.openReadStream("/home/agentos/empty")).stream)).length, 0);
    assert.equal((await rejection(vm.openReadStream("/home/agentos/digits", { start: -1 }))).code, "INVALID_ARGUMENT");
  });

  it("tar out and back in", async () => {
    await vm.writeFile("/home/agentos/t/a.txt", "A", { mode: 0o600 });
    const archive = await vm.readTar("/home/agentos/t");
    assert.deepEqual(await vm.writeTar("/home/agentos/t2", archive), { files: 1, directories: 0, symlinks: 0, skipped: 0 });
    assert.equal(text(await vm.readFile("/home/agentos/t2/a.txt")), "A");
    assert.equal((await vm.stat("/home/agentos/t2/a.txt")).mode & 0o777, 0o600);
    assert.equal((await rejection(vm.writeTar("/home/agentos/t3", "not a stream" as never))).code, "INVALID_ARGUMENT");
  });

  it("watch, iterated in process", async () => {
    await vm.mkdir("/home/agentos/w", { recursive: true });
    const watch = await vm.watch("w");
    assert.equal(watch.path, "/home/agentos/w");
    await vm.exec("sh", ["-c", "echo hi > /home/agentos/w/new"]);
    for await (const event of watch) {
      assert.deepEqual(event, { type: "create", path: "/home/agentos/w/new" });
      break;
    }
    await watch.closed;
    assert.equal((await rejection(vm.watch("/home/agentos/missing"))).code, "ENOENT");
  });
});
