// Deferred: wire the theme toggle and put the cursor where the user needs it.
(function () {
  "use strict";
  var root = document.documentElement;
  var toggle = document.getElementById("theme-toggle");

  function show(theme) {
    root.setAttribute("data-theme", theme);
    toggle.setAttribute("aria-pressed", theme === "dark" ? "true" : "false");
  }

  if (toggle) {
    var chosen = false;
    show(root.getAttribute("data-theme") === "dark" ? "dark" : "light");
    toggle.hidden = false;
    toggle.addEventListener("click", function () {
      var theme = root.getAttribute("data-theme") === "dark" ? "light" : "dark";
      chosen = true;
      show(theme);
      try {
        window.localStorage.setItem("ezauth-theme", theme);
      } catch (e) {
        // Storage may be disabled; the toggle still works for this page.
      }
    });
    // Until the user picks a theme, follow the system when it switches (e.g. at sunset).
    var system = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)");
    var stored = null;
    try {
      stored = window.localStorage.getItem("ezauth-theme");
    } catch (e) {
      stored = null;
    }
    if (system && system.addEventListener && !stored) {
      system.addEventListener("change", function (event) {
        if (!chosen) {
          show(event.matches ? "dark" : "light");
        }
      });
    }
  }

  // The #fragment of the page first asked for never reaches the server, but the browser keeps
  // it across the redirect to this page: carry it in the return target (the server checks it).
  var rd = document.querySelector("input[name=rd]");
  if (rd && window.location.hash && rd.value.indexOf("#") === -1) {
    rd.value = rd.value + window.location.hash;
  }

  // The account page: a copy button for a new API token (without script, select the text).
  var copy = document.querySelector("button[data-copy]");
  var copied = copy && document.getElementById(copy.getAttribute("data-copy"));
  if (copied && navigator.clipboard) {
    copy.hidden = false;
    copy.addEventListener("click", function () {
      navigator.clipboard.writeText(copied.value);
      copied.select();
    });
  }

  // The account page's times come in UTC, since the server cannot know the visitor's zone: show
  // them in the browser's own, the UTC kept as the tooltip. Without script they stay UTC, and say so.
  function pad(number) {
    return (number < 10 ? "0" : "") + number;
  }

  function zoneName(when) {
    try {
      var parts = new Intl.DateTimeFormat(root.lang || undefined, { timeZoneName: "short" }).formatToParts(when);
      for (var i = 0; i < parts.length; i += 1) {
        if (parts[i].type === "timeZoneName") {
          return " " + parts[i].value;
        }
      }
    } catch (e) {
      // No Intl, or a language it does not know: the time is still local, only unnamed.
    }
    return "";
  }

  var times = document.querySelectorAll("time[datetime]");
  for (var t = 0; t < times.length; t += 1) {
    var when = new Date(times[t].getAttribute("datetime"));
    if (!isNaN(when.getTime())) {
      times[t].title = times[t].textContent;
      times[t].textContent = when.getFullYear() + "-" + pad(when.getMonth() + 1) + "-" + pad(when.getDate()) +
        " " + pad(when.getHours()) + ":" + pad(when.getMinutes()) + zoneName(when);
    }
  }

  // After a failed attempt the username is kept: continue with the password.
  var username = document.getElementById("username");
  var password = document.getElementById("password");
  if (username && password && username.value !== "") {
    password.focus();
  }
  // The code step (two-factor users): the code is all that is left to type.
  var code = document.getElementById("code");
  if (code && !code.matches(":disabled")) {
    code.focus();
  }
})();
