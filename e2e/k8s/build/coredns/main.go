// CoreDNS for the tier-2 node (e2e/k8s/node.sh): the cluster's DNS (Services, the gateway pods'
// stable names under their headless Service, which the operator dials), with only the plugins
// the node's Corefile uses. Its own module: CoreDNS's dependencies must not move the versions
// the Kubernetes binaries of ../go.mod are built with.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
