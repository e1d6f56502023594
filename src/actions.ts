/**
 * The actions a VM exposes to clients, one to one with `Vm` methods. The server
 * dispatches only these names; the client's types are derived from `Vm` for
 * exactly this list, so the two cannot drift apart.
 */
export const VM_ACTIONS = [
  "writeFile",
  "readFile",
  "mkdir",
  "readdir",
  "stat",
  "exists",
  "deleteFile",
  "remove",
  "move",
  "spawn",
  "exec",
  "waitProcess",
  "killProcess",
  "listProcesses",
  "getProcessLogs",
  "writeProcessStdin",
  "closeProcessStdin",
  "listeningPorts",
  "usage",
  "setLifecycle",
  "createSignedPreviewUrl",
  "expireSignedPreviewUrl",
  "listPreviewUrls",
  "expireAllPreviewUrls",
] as const;

export type VmActionName = (typeof VM_ACTIONS)[number];

const ACTION_SET: ReadonlySet<string> = new Set(VM_ACTIONS);

export function isVmAction(name: string): name is VmActionName {
  return ACTION_SET.has(name);
}

/** Events a connection delivers. */
export const VM_EVENTS = ["processOutput", "processExit"] as const;
export type VmEventName = (typeof VM_EVENTS)[number];
