/**
 * agentvm/software — what a VM definition's `software: [...]` may list.
 *
 *   import { common, pi } from "agentvm/software";
 *   agentOS({ software: [common, pi] });
 *
 * `common` (shell, coreutils, git, curl, node, npm) is in every VM's base image;
 * `pi` adds the Pi coding agent (`pi` on PATH). agentOS's own packages
 * (@rivet-dev/agent-os-common, @rivet-dev/agent-os-pi) are accepted as well.
 */
export { common, pi, parseSoftware, SOFTWARE_NAMES } from "./image/software.ts";
export type { SoftwareDescriptor, SoftwareEntry, SoftwareName } from "./image/software.ts";
