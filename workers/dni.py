"""Decoupled neural interfaces (synthetic gradients, Jaderberg et al. 2016), docs/experiments.md section 3.

The model, `dni_rnn`, is built in workers.models: a recurrent net unrolled over 2 steps
(t1, t2), a sigmoid output layer (out), a squared-error loss, and per recurrent step a
linear synthetic-gradient model g_hat = h sg_w + sg_b. The `synthetic` schedule updates
each step's weights from its g_hat as soon as its forward is done, then trains each g_hat
toward the true gradient that arrives later. `standard` on the same model is back propagation through time.
"""

from __future__ import annotations


def synthetic_step(step, x, y_onehot):
    """One DNI step: per recurrent unit, forward then update at once from its synthetic
    gradient (lr = recurrent_lr); the output unit from the true gradient (lr); then each
    synthetic-gradient model one SGD step (synthetic_lr) toward the true gradient of its
    unit's state, back-propagated from the loss through the units above with the weights
    their forward used (the layers cache snapshots, so the updates made in between do not
    leak into the targets).
    Logs synthetic_error: mean squared error of the predictions against those targets."""
    import tensorflow as tf

    net, settings = step.net, step.settings
    assert net.model.name == "dni_rnn", "the synthetic schedule needs model dni_rnn"
    recurrent = range(net.depth - 1)
    hidden = settings.hidden[0]
    dtype = net.dtype
    acts, caches, predictions = [x], [], []
    for index in recurrent:
        y, cache = net.forward_unit(index, acts[-1], step.ctx)
        state = y[:, -hidden:]  # (B, hidden)
        variables = net.variables[index]
        g_hat = tf.matmul(state, variables["sg_w"]) + variables["sg_b"]
        d_y = tf.concat([tf.zeros_like(y[:, :-hidden]), g_hat], axis=1)  # no gradient for the carried image
        _, grads = net.backward_unit(index, d_y, cache, need_d_x=False, need_grads=True)
        step.saw_error(index, d_y, first_column=d_y.shape[1] - hidden)
        step.update({index: grads}, lr=tf.constant(settings.recurrent_lr, dtype))
        acts.append(y)
        caches.append(cache)
        predictions.append((state, g_hat))
    top = net.depth - 1
    output, cache = net.forward_unit(top, acts[-1], step.ctx)
    loss, d_out = step.loss(output, y_onehot)
    true_d, grads = net.backward_unit(top, d_out, cache, need_d_x=True, need_grads=True)
    step.update({top: grads})
    errors = []
    batch = tf.cast(tf.shape(x)[0], dtype)
    for index in reversed(recurrent):
        state, g_hat = predictions[index]
        step.interface(index, g_hat, true_d[:, -hidden:])
        error = g_hat - true_d[:, -hidden:]  # (B, hidden)
        errors.append(tf.reduce_mean(tf.reduce_sum(error * error, axis=1)))
        variables = net.variables[index]
        lr_sg = tf.constant(settings.synthetic_lr, dtype)
        # d/d(sg) of 0.5 * mean_b ||g_hat - target||^2
        variables["sg_w"].assign_sub(lr_sg * tf.matmul(state, error, transpose_a=True) / batch)
        variables["sg_b"].assign_sub(lr_sg * tf.reduce_sum(error, axis=0) / batch)
        if index > 0:
            true_d, _ = net.backward_unit(index, true_d, caches[index], need_d_x=True, need_grads=False)
    step.extras["synthetic_error"] = tf.add_n(errors) / len(errors)
    return loss, output
