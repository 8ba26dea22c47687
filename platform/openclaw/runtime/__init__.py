"""What runs inside Ray Train: the training loop and its attempt (workers), checkpoint saving, stop
signals and the resize and non-finite policies (workers), the control plane (an actor on the driver's
node), the controller callbacks (Ray Train's controller), and `ray_private`, the one module that
imports private Ray APIs."""
