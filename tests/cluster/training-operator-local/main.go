// Command training-operator-local runs the Kubeflow training-operator v1.9.4 PyTorchJob
// controller and its validating webhook out of cluster for tests.
//
// The stock cmd/training-operator.v1 binds its webhook server to every interface (port 9443),
// writes its serving certificate to a fixed /tmp path and manages a Secret in the "kubeflow"
// namespace. Tests must only listen on 127.0.0.1 and run side by side, so this entry point
// wires the same reconciler and webhook packages with every listener on a chosen host and the
// serving certificate taken from a directory the test harness generates.
package main

import (
	"flag"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	"github.com/kubeflow/training-operator/pkg/config"
	controllerv1 "github.com/kubeflow/training-operator/pkg/controller.v1"
	"github.com/kubeflow/training-operator/pkg/controller.v1/common"
	"github.com/kubeflow/training-operator/pkg/webhooks"
)

func main() {
	host := flag.String("bind-host", "127.0.0.1", "Address every listener binds to.")
	probeAddr := flag.String("health-probe-bind-address", "127.0.0.1:0", "Health/ready probe address.")
	webhookPort := flag.Int("webhook-server-port", 0, "Webhook port on --bind-host; 0 disables the webhook.")
	certDir := flag.String("cert-dir", "", "Directory with tls.crt and tls.key for the webhook.")
	threads := flag.Int("controller-threads", 1, "Worker threads per controller.")
	// The same defaults as the stock binary (PyTorchJob workers get an init container that
	// waits for the master's DNS name).
	flag.StringVar(&config.Config.PyTorchInitContainerImage, "pytorch-init-container-image",
		config.PyTorchInitContainerImageDefault, "Image of the PyTorchJob worker init container.")
	flag.StringVar(&config.Config.PyTorchInitContainerTemplateFile, "pytorch-init-container-template-file",
		config.PyTorchInitContainerTemplateFileDefault, "Template file of that init container.")
	flag.IntVar(&config.Config.PyTorchInitContainerMaxTries, "pytorch-init-container-max-tries",
		config.PyTorchInitContainerMaxTriesDefault, "Tries of that init container.")
	flag.StringVar(&config.Config.MPIKubectlDeliveryImage, "mpi-kubectl-delivery-image",
		config.MPIKubectlDeliveryImageDefault, "Image of the MPIJob launcher init container.")
	var schemes controllerv1.EnabledSchemes
	flag.Var(&schemes, "enable-scheme", "Job kinds to run (repeatable); default PyTorchJob.")
	opts := zap.Options{Development: true}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")
	if schemes.Empty() {
		_ = schemes.Set(kubeflowv1.PyTorchJobKind)
	}

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(kubeflowv1.AddToScheme(scheme))

	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: *probeAddr,
		WebhookServer:          webhook.NewServer(webhook.Options{Host: *host, Port: *webhookPort, CertDir: *certDir}),
	})
	if err != nil {
		log.Error(err, "unable to create manager")
		os.Exit(1)
	}
	utilruntime.Must(mgr.AddHealthzCheck("healthz", healthz.Ping))
	for _, s := range schemes {
		setup, ok := controllerv1.SupportedSchemeReconciler[s]
		if !ok {
			log.Info("unsupported scheme", "scheme", s)
			os.Exit(2)
		}
		if err := setup(mgr, common.GenNonGangSchedulerSetupFunc(), *threads); err != nil {
			log.Error(err, "unable to create controller", "scheme", s)
			os.Exit(1)
		}
		if *webhookPort == 0 {
			continue
		}
		if err := webhooks.SupportedSchemeWebhook[s](mgr); err != nil {
			log.Error(err, "unable to set up webhook", "scheme", s)
			os.Exit(1)
		}
	}
	if *webhookPort != 0 {
		utilruntime.Must(mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker()))
	} else {
		utilruntime.Must(mgr.AddReadyzCheck("readyz", healthz.Ping))
	}
	log.Info("starting manager", "schemes", schemes.String())
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
