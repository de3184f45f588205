// Validates Strimzi custom resources (a JSON array on stdin) with the validators that
// @kubernetes-models/strimzi-kafka-operator generates from Strimzi's CRD schemas, and prints
// one JSON line per resource: {kind, name, errors}. Exit status 1 when any has errors.
//
// Why: kubeconform needs the CRD files, which no registry reachable here publishes for
// Strimzi; this npm package carries their schemas compiled. It checks what the API server
// would (types, enums, required fields); like the API server it ignores unknown fields,
// which tests/unit/test_k8s.py checks for the fields that matter.
import { readFileSync } from "node:fs";

const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const doc of docs) {
  const [group, version] = String(doc.apiVersion).split("/");
  const name = doc.metadata?.name;
  let errors = [];
  try {
    // The module path is built from the document: plain names only, no path tricks.
    if (![group, version, doc.kind].every((part) => /^[A-Za-z0-9.]+$/.test(part ?? "") && !part.includes(".."))) {
      throw new Error(`not a Strimzi resource: ${doc.apiVersion} ${doc.kind}`);
    }
    const module = await import(`@kubernetes-models/strimzi-kafka-operator/${group}/${version}/${doc.kind}`);
    new module[doc.kind](doc).validate();
  } catch (error) {
    errors = [error.message]; // a failed check, or no schema for this apiVersion and kind
  }
  failed ||= errors.length > 0;
  console.log(JSON.stringify({ kind: doc.kind, name, errors }));
}
process.exit(failed ? 1 : 0);
