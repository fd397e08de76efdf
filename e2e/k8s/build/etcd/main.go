// etcd for the tier-1 cluster tests: the upstream etcd server's own entry point, built from the
// go.etcd.io/etcd/server/v3 module that k8s.io/kubernetes already requires (so the API server
// gets the etcd release it is tested with, not Debian's 3.4).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
